"""Shared fixtures: the real data sets in ../shared/data, found through one helper."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Subprocesses started by the tests (``python -m posttrain.cli ...``, ``accelerate launch``) must import the
# installed package, not the checkout: with the working directory on sys.path, the checkout's ``posttrain/`` would
# shadow the installed one (which alone holds posttrain.judges/rewards/kernels). Python 3.11's safe-path mode
# keeps the working directory off sys.path for every child that inherits this environment.
os.environ["PYTHONSAFEPATH"] = "1"


def shared_data_dir() -> Path:
    """The folder of real data sets: $POSTTRAIN_SHARED_DATA, else ../shared/data beside the checkout."""
    path = Path(os.environ.get("POSTTRAIN_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not (path / "README.md").is_file():
        raise RuntimeError(
            f"shared data not found at {path}: set POSTTRAIN_SHARED_DATA to the folder holding gsm8k/, humaneval/, bfcl/"
        )
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_data_dir()


@pytest.fixture
def one_thread():
    """One torch thread for the test: the CI machine has 2 shared cores, and one thread per process avoids
    oversubscription stalls (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def save_tiny_checkpoint(tmp_path_factory):
    """A function ``(name, steps=0) -> (tokenizer, model, folder)``: ``posttrain.synthetic.tiny_model`` trained for
    ``steps`` on one torch thread, saved with its tokenizer in a fresh folder called ``name``."""
    import torch

    from posttrain.synthetic import tiny_model

    def save(name: str, steps: int = 0):
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            tokenizer, model = tiny_model(steps=steps)
        finally:
            torch.set_num_threads(before)
        folder = tmp_path_factory.mktemp(f"{name}_ckpt") / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return tokenizer, model, folder

    return save


@pytest.fixture
def fresh_precision():
    """accelerate keeps one process-wide state whose mixed precision cannot change: forget it around a test that
    switches precision, so that it and the tests after it start from none."""
    from accelerate.state import AcceleratorState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)

    reset()
    yield reset
    reset()
