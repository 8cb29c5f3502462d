"""Shared fixtures: the real data sets in ../shared/data, found through one helper."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


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
