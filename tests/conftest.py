"""Keep Ray, Flower and matplotlib out of the home folder and /tmp: every test session gets its own temp dirs."""

import os
import shutil
import tempfile

import torch

_HOME = tempfile.mkdtemp(prefix="florana-tests-")
for var, sub in (("FLWR_HOME", "flwr"), ("RAY_TMPDIR", "ray"), ("MPLCONFIGDIR", "mpl"), ("HF_HOME", "hf"),
                 ("TORCHINDUCTOR_CACHE_DIR", "inductor")):  # made when torch._inductor is imported
    os.environ[var] = os.path.join(_HOME, sub)
    os.makedirs(os.environ[var], exist_ok=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


def pytest_unconfigure(config):
    """Remove this process's temp dirs. Under pytest-xdist the controller and each worker import this file and make
    their own; a session fixture runs only where tests run, so it left the controller's behind on every run."""
    shutil.rmtree(_HOME, ignore_errors=True)
