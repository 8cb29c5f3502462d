"""Recipes: YAML groups, dotted overrides (list items by index or id), mappings with typed keys, list items chosen
by name, renamed fields, inherited fields' docs, and clear errors for wrong names and values."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pytest

from posttrain.config import ConfigError, choose_by_name, describe_config, field_docs, load_config


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


# -- mappings with typed keys, list items in overrides, items chosen by name ----------------------------------------


@dataclass
class Circle:
    radius: float = 1.0


@dataclass
class Square:
    side: int = 2
    label: str = ""


@dataclass
class Shape:
    name: str
    id: str
    options: object


@dataclass
class Drawing:
    shapes: list[Shape] = field(default_factory=list,
                                metadata=choose_by_name({"circle": Circle, "square": Square}, kind="shape"))
    fractions: dict[int, float] = field(default_factory=lambda: {2: 0.2})
    tags: list[dict[str, str]] = field(default_factory=list)
    warmup_steps: int = 0


def test_mapping_keys_and_values_take_their_declared_types(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("fractions:\n  2: 0.5\n  '3': 1\n")
    assert load_config(Drawing, path).fractions == {2: 0.5, 3: 1.0}
    # an override's key is text: "2" addresses the key 2 already there, "4" adds the key 4
    cfg = load_config(Drawing, path, ["fractions.2=0.75", "--fractions.4", "0.25"])
    assert cfg.fractions == {2: 0.75, 3: 1.0, 4: 0.25}
    assert load_config(Drawing).fractions == {2: 0.2}  # not given: the default
    with pytest.raises(ConfigError, match=r"d\.yaml: fractions key 'two' must be an integer, got 'two'"):
        load_config(Drawing, path, ["fractions.two=0.1"])
    with pytest.raises(ConfigError, match=r"d\.yaml: fractions\.3 must be a number, got 'lots'"):
        load_config(Drawing, path, ["fractions.3=lots"])


def test_items_chosen_by_name_become_item_records(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("shapes:\n  - name: circle\n    radius: 3\n  - name: square\n    id: big\n    side: 9\n"
                    "  - name: square\n")
    cfg = load_config(Drawing, path)
    assert cfg.shapes == [Shape("circle", "circle", Circle(3.0)), Shape("square", "big", Square(9)),
                          Shape("square", "square", Square())]
    assert load_config(Drawing, path, ["shapes=[]"]).shapes == []
    path.write_text("shapes:\n")
    assert load_config(Drawing, path).shapes == []  # left empty: no items


@pytest.mark.parametrize("text, needle", [
    ("shapes:\n  - name: hexagon\n", "d.yaml: shapes[0].name: unknown shape 'hexagon' (known: circle, square)"),
    ("shapes:\n  - radius: 1\n", "d.yaml: shapes[0] must be a mapping with a name (one of circle, square)"),
    ("shapes: circle\n", "d.yaml: shapes must be a list of mappings, each with a name"),
    ("shapes:\n  - name: circle\n  - name: circle\n",
     "d.yaml: shapes[1].id: 'circle' must be a unique string; give repeated shapes distinct ids"),
    ("shapes:\n  - name: square\n  - name: circle\n    sides: 0\n",
     "d.yaml: unknown field shapes[1].sides (known in shapes[1]: radius)"),
    ("shapes:\n  - name: square\n    side: 1.5\n", "d.yaml: shapes[0].side must be an integer, got 1.5"),
])
def test_items_chosen_by_name_errors_name_the_item(tmp_path, text, needle):
    path = tmp_path / "d.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(Drawing, path)
    assert needle in str(err.value)


def test_overrides_address_list_items_by_index_id_or_name(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("shapes:\n  - name: circle\n  - name: square\n    id: big-one\n  - name: square\n"
                    "tags:\n  - {name: a, colour: red}\n")
    cfg = load_config(Drawing, path, ["shapes.0.radius=5", "--shapes.big-one.side", "7", "shapes.square.label=x",
                                      "--tags.a.colour=blue", "--warmup-steps", "3"])
    assert cfg.shapes == [Shape("circle", "circle", Circle(5.0)), Shape("square", "big-one", Square(7)),
                          Shape("square", "square", Square(2, "x"))]
    assert cfg.tags == [{"name": "a", "colour": "blue"}] and cfg.warmup_steps == 3
    # overrides apply in order: an item renamed by one is addressed by its new id in the next
    cfg = load_config(Drawing, path, ["shapes.2.id=small", "shapes.small.side=1"])
    assert cfg.shapes[2] == Shape("square", "small", Square(1))
    with pytest.raises(ConfigError, match=r"override shapes\.7\.radius: no list item '7' \(an index below 3, "):
        load_config(Drawing, path, ["shapes.7.radius=1"])
    with pytest.raises(ConfigError, match=r"override shapes\.0\.radius\.x: shapes\.0\.radius is not a group"):
        load_config(Drawing, path, ["shapes.0.radius=1", "shapes.0.radius.x=1"])
    with pytest.raises(ConfigError, match=r"override warmup_steps: '\[1' is not a YAML value"):
        load_config(Drawing, path, ["warmup_steps=[1"])


def test_a_group_left_empty_keeps_its_defaults(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim:\nsteps: 3\n")
    cfg = load_config(Recipe, path)
    assert cfg.optim == Optim() and cfg.steps == 3
    assert load_config(Recipe, path, ["--optim.lr", "0.5"]).optim == Optim(lr=0.5)  # an override fills it


# -- renamed fields ---------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    RENAMED: ClassVar[dict[str, str]] = {"resume": "resume_from"}

    every_steps: int = 0
    resume_from: str | None = None


@dataclass
class Run:
    steps: int = 1


@dataclass
class Command:
    RENAMED: ClassVar[dict[str, str]] = {"run.save_every": "checkpoint.every_steps", "seed": "run.seed"}

    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    run: Run = field(default_factory=Run)


@pytest.mark.parametrize("text, overrides, message", [
    ("run:\n  save_every: 5\n", [], "{path}: run.save_every was renamed checkpoint.every_steps"),
    ("", ["--run.save_every", "5"], "{path}: run.save_every was renamed checkpoint.every_steps"),
    ("seed: 3\nrun:\n  steps: 2\n", [], "{path}: seed was renamed run.seed"),
    ("checkpoint:\n  resume: latest\n", [], "{path}: checkpoint.resume was renamed checkpoint.resume_from"),
    ("", ["checkpoint.resume=latest"], "{path}: checkpoint.resume was renamed checkpoint.resume_from"),
    # before any other error of the same mapping: an unknown field, a wrong value beside it
    ("run:\n  save_every: 5\n  stepz: 1\n", [], "{path}: run.save_every was renamed checkpoint.every_steps"),
    ("checkpoint:\n  every_steps: many\n  resume: latest\n", [],
     "{path}: checkpoint.resume was renamed checkpoint.resume_from"),
])
def test_a_renamed_field_names_its_new_name(tmp_path, text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(Command, path, overrides)
    assert str(err.value) == message.format(path=path)


def test_renames_are_not_fields():
    assert [f.name for f in dataclasses.fields(Command)] == ["checkpoint", "run"]
    assert [f.name for f in dataclasses.fields(Checkpoint)] == ["every_steps", "resume_from"]
    cfg = load_config(Command, None, ["--checkpoint.every_steps", "4", "checkpoint.resume_from=latest"])
    assert cfg.checkpoint == Checkpoint(4, "latest") and cfg.run == Run()
    with pytest.raises(ConfigError, match=r"defaults: unknown field RENAMED"):
        load_config(Command, None, ["RENAMED=1"])
    assert "RENAMED" not in describe_config(Command)


# -- inherited fields' docs -------------------------------------------------------------------------------------------


@dataclass
class BaseOptim:
    """Optimiser settings.

    eps: added to the denominator
    """

    lr: float = 1e-4  # peak learning rate
    # gradient clipping
    # by global norm
    max_grad_norm: float = 1.0
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled weight decay


@dataclass
class GrpoOptim(BaseOptim):
    mini_batches: int = 2  # optimizer steps per generation batch
    lr: float = 1e-6
    weight_decay: float = 0.1  # applied to the matrices only


@dataclass
class GrpoRecipe:
    optim: GrpoOptim = field(default_factory=GrpoOptim)


def test_inherited_fields_take_their_docs_from_the_nearest_base_that_documents_them():
    assert field_docs(GrpoOptim) == {
        "lr": "peak learning rate",  # redeclared without a doc: the base's
        "max_grad_norm": "gradient clipping by global norm",
        "eps": "added to the denominator",
        "weight_decay": "applied to the matrices only",  # redeclared with its own doc: that one
        "mini_batches": "optimizer steps per generation batch",
    }
    text = describe_config(GrpoRecipe)
    assert "  --optim.lr float  (default: 1.0e-06)\n      peak learning rate\n" in text
    assert "  --optim.eps float  (default: 1.0e-08)\n      added to the denominator\n" in text
    assert "  --optim.mini_batches int  (default: 2)\n      optimizer steps per generation batch" in text
