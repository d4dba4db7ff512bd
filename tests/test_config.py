"""Run configs: TOML in and out, unknown keys and bad values refused with the file named."""

import pytest

from florana.config import RunConfig, config_from_dict, load_config
from florana.errors import FloranaError


def test_toml_round_trip(tmp_path):
    cfg = RunConfig(method="svd", alpha=0.1, target_modules=["query", "key"], rounds=3)
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


def test_unknown_key_names_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('method = "fedit"\nround = 3\n')
    with pytest.raises(FloranaError, match=rf"{path}: unknown key\(s\) round"):
        load_config(path)


@pytest.mark.parametrize("data, message", [
    ({"alpha": 0}, "alpha must be > 0"),
    ({"alpha": -1.0}, "alpha must be > 0"),
    ({"method": "fedprox"}, "unknown method 'fedprox'"),
    ({"rounds": "3"}, "rounds should be int"),
    ({"bf16": 1}, "bf16 should be bool"),
    ({"partition": "zipf"}, "unknown partition"),
    ({"task": "regression"}, "task must be"),
])
def test_bad_values(data, message):
    with pytest.raises(FloranaError, match=message):
        config_from_dict(data, "cfg.toml")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(FloranaError, match="no such config file"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("method = \n")
    with pytest.raises(FloranaError, match="invalid TOML"):
        load_config(bad)


def test_shipped_configs_parse_and_default_matches():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs"
    assert load_config(root / "default.toml") == RunConfig()
    smoke = load_config(root / "gsm_smollm2_smoke.toml")
    assert smoke.task == "causal_lm" and smoke.model == "smollm2"
