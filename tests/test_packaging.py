"""The installed package's metadata: what a user's installer and licence scanner read."""

from importlib.metadata import distribution
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_licence_is_an_spdx_expression_and_its_text_ships():
    """PEP 639: `License-Expression` (a TOML table for `license` is deprecated and setuptools stops building it after
    2027-02-18) and the licence text itself, which the metadata names and the wheel carries."""
    meta = distribution("florana").metadata
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
