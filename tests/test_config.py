"""Recipes: YAML groups, dotted overrides, and clear errors for wrong names and values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from posttrain.config import ConfigError, load_config


@dataclass
class Optim:
    lr: float = 1e-4  # peak learning rate
    schedule: Literal["cosine", "wsd"] = "cosine"
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Recipe:
    optim: Optim = field(default_factory=Optim)
    steps: int = 10
    name: str | None = None


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  lr: 3.0e-4\n  schedule: wsd\nsteps: 5\n")
    cfg = load_config(Recipe, path, ["--optim.lr", "1e-5", "steps=7", "--name=x"])
    assert cfg.optim.lr == 1e-5 and cfg.optim.schedule == "wsd" and cfg.steps == 7 and cfg.name == "x"
    assert cfg.optim.betas == (0.9, 0.95)


@pytest.mark.parametrize("text, overrides, needle", [
    ("optim:\n  lrr: 1\n", [], "unknown field optim.lrr"),
    ("steps: 2.5\n", [], "steps must be an integer"),
    ("optim:\n  schedule: linear\n", [], "optim.schedule must be one of"),
    ("", ["--optim.lr", "fast"], "optim.lr must be a number"),
    ("optim: 3\n", [], "optim must be a mapping"),
    ("steps: [1\n", [], "line"),
])
def test_errors_name_the_field_and_file(tmp_path, text, overrides, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(Recipe, path, overrides)
    assert needle in str(err.value) and "bad.yaml" in str(err.value)
