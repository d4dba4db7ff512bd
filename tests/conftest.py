"""Keep Ray, Flower and matplotlib out of the home folder and /tmp: every test session gets its own temp dirs."""

import os
import tempfile

import pytest
import torch

_HOME = tempfile.mkdtemp(prefix="florana-tests-")
for var, sub in (("FLWR_HOME", "flwr"), ("RAY_TMPDIR", "ray"), ("MPLCONFIGDIR", "mpl"), ("HF_HOME", "hf")):
    os.environ[var] = os.path.join(_HOME, sub)
    os.makedirs(os.environ[var], exist_ok=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _clean_home():
    yield
    import shutil

    shutil.rmtree(_HOME, ignore_errors=True)
