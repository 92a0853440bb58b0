import os

# Triton kernels run on CPU only through the interpreter, and the flag must be set before any
# @triton.jit function is defined, i.e. before the first import of mhc_kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def subprocess_env(tmp_path_factory) -> dict:
    """Environment for training subprocesses (torchrun workers): one bundled-dataset cache built
    here, before several processes would race to build it; one thread per process."""
    from mhc_train.data import ensure_bundled_dataset

    cache = tmp_path_factory.mktemp("mhc-cache")
    env = dict(os.environ, MHC_TRAIN_CACHE=str(cache), OMP_NUM_THREADS="1", PY=sys.executable,
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    old = os.environ.get("MHC_TRAIN_CACHE")
    os.environ["MHC_TRAIN_CACHE"] = str(cache)
    try:
        ensure_bundled_dataset(vocab_size=512)
    finally:
        if old is None:
            os.environ.pop("MHC_TRAIN_CACHE")
        else:
            os.environ["MHC_TRAIN_CACHE"] = old
    return env


@pytest.fixture(scope="module")
def composer():
    """``composer(*overrides)``: the trainer's composed config (``configs/config.yaml``), as the
    ``mhc-train`` command would build it from those overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mhc_train.train.config import CONFIG_DIR, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield lambda *overrides: compose("config", overrides=list(overrides))
    GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module (``pytestmark = pytest.mark.usefixtures(...)``): the tiny
    model gains nothing from a second thread, and on a busy machine OpenMP's waiting threads make
    it several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
