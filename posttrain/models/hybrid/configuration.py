"""The hybrid model's configuration: the fields of transformers' ``GraniteMoeHybridConfig``, checked up front.

A config.json written here loads in transformers and vLLM as ``granitemoehybrid``; a Granite 4.0-H config.json
loads here. Validation names the offending field; this module never builds tensors.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from posttrain.config import ConfigError
from posttrain.provenance import write_manifest

MODEL_TYPE = "granitemoehybrid"
ARCHITECTURE = "GraniteMoeHybridForCausalLM"

# Layer type names: the published checkpoints say "mamba"/"attention"; transformers 5 rewrites them in memory
# as "linear_attention"/"full_attention". Both are read; the published names are written.
_LAYER_ALIASES = {
    "mamba": "mamba",
    "linear_attention": "mamba",
    "attention": "attention",
    "full_attention": "attention",
}


def _need(cond: bool, name: str, why: str) -> None:
    if not cond:
        raise ConfigError(f"config field '{name}': {why}")


def _need_positive_integers(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        _need(isinstance(value, int) and not isinstance(value, bool) and value > 0, name,
              f"must be a positive integer, got {value!r}")


def _json_fields(data: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """A copy of a config.json's fields without ``architectures`` and ``model_type`` (which must be ``model_type``
    when given)."""
    data = dict(data)
    found = data.pop("model_type", model_type)
    if found != model_type:
        raise ConfigError(f"{source}: model_type is {found!r}, expected {model_type!r}")
    data.pop("architectures", None)
    return data


def _from_fields(cls: type, data: dict[str, Any], source: str):
    """``cls`` from config.json fields: its dataclass fields as arguments, the others kept in ``extra``. A value of
    another type than a field declared bool, int or float (an int for a float is fine; None where the field allows
    it), or any failed check, is a ``ConfigError`` naming ``source`` (never a bare TypeError from inside the checks)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
    kwargs = {k: v for k, v in data.items() if k in fields}
    for name, value in kwargs.items():
        kind = str(fields[name].type).removesuffix(" | None")
        want, what = {"bool": (bool, "true or false"), "int": (int, "an integer"),
                      "float": ((int, float), "a number")}.get(kind, (None, ""))
        if want and not (isinstance(value, want) or value is None and kind != fields[name].type):
            raise ConfigError(f"{source}: field '{name}' must be {what}, got {value!r}")
    try:
        return cls(**kwargs, extra={k: v for k, v in data.items() if k not in fields})
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from None


@dataclass
class _ConfigJSON:
    """What both configs share: the fields transformers' ``GraniteConfig`` and ``GraniteMoeHybridConfig`` both have,
    with the same defaults; the layer indices by kind; and config.json in and out (written atomically, read with
    errors naming the file, turned into transformers' config class of the same ``model_type``)."""

    model_type: ClassVar[str]
    architecture: ClassVar[str]
    transformers_class: ClassVar[str]
    not_for_transformers: ClassVar[tuple[str, ...]] = ("architectures", "model_type", "rope_theta")
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008  # the MLP's width (the hybrid: per expert)
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: num_attention_heads (no grouping)
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    attention_bias: bool = False
    # Granite's muP-style multipliers
    attention_multiplier: float = 1.0  # the softmax scale (replaces 1/sqrt(head_dim))
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # config.json's other fields, written back

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate()

    def validate(self) -> None:
        """The checks of the shared fields; each config's own follow."""
        _need_positive_integers(self, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"))
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        _need(isinstance(kv, int) and kv > 0 and heads % kv == 0, "num_key_value_heads",
              f"{kv!r} must be a positive divisor of num_attention_heads {heads}")
        _need(self.hidden_act == "silu", "hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "attention"]

    @property
    def mamba_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "mamba"]

    def _fields_dict(self, skip: tuple[str, ...]) -> dict[str, Any]:
        """``architectures``, ``model_type`` and the dataclass fields but ``extra`` and ``skip``."""
        out: dict[str, Any] = {"architectures": [self.architecture], "model_type": self.model_type}
        for f in dataclasses.fields(self):
            if f.name not in ("extra", *skip):
                out[f.name] = getattr(self, f.name)
        return out

    def save(self, folder: str | Path) -> None:
        write_manifest(Path(folder) / "config.json", self.to_dict())

    @classmethod
    def load(cls, folder: str | Path):
        return cls.from_dict(_read_config_json(folder), source=str(Path(folder) / "config.json"))

    def to_transformers(self):
        """The same configuration as transformers' config class (for parity tests and export)."""
        import transformers

        data = self.to_dict()
        for key in self.not_for_transformers:
            data.pop(key, None)
        if hasattr(self, "time_step_limit"):  # left out of config.json when it is the default, which has infinity
            data.setdefault("time_step_limit", list(self.time_step_limit))
        return getattr(transformers, self.transformers_class)(**data)


@dataclass
class HybridConfig(_ConfigJSON):
    model_type: ClassVar[str] = MODEL_TYPE
    architecture: ClassVar[str] = ARCHITECTURE
    transformers_class: ClassVar[str] = "GraniteMoeHybridConfig"
    not_for_transformers: ClassVar[tuple[str, ...]] = (*_ConfigJSON.not_for_transformers, "mamba_norm_per_group")
    layer_types: list[str] | None = None  # "mamba" or "attention" per layer; None: all Mamba
    position_embedding_type: str | None = None  # attention layers: None or "nope": no positions; "rope": rotary
    # Mamba-2 layers
    mamba_n_heads: int = 128
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_head: int | str = "auto"
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    # Gated RMSNorm of the Mamba output: per group of B/C (mamba_ssm, vLLM, transformers >= 5.18), or over the whole
    # inner dimension (transformers <= 5.17). Identical when mamba_n_groups == 1, as in every published Granite 4.0-H.
    mamba_norm_per_group: bool = True
    # feed-forward: a shared MLP in every layer, plus a top-k mixture of experts (of intermediate_size each) when
    # num_local_experts > 0
    shared_intermediate_size: int = 1024
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False

    def __post_init__(self) -> None:
        if self.layer_types is None:
            self.layer_types = ["mamba"] * self.num_hidden_layers
        if self.position_embedding_type == "nope":
            self.position_embedding_type = None
        if self.mamba_d_head == "auto" and self.mamba_n_heads and \
                (self.mamba_expand * self.hidden_size) % self.mamba_n_heads == 0:
            self.mamba_d_head = self.mamba_expand * self.hidden_size // self.mamba_n_heads
        self.time_step_limit = tuple(float(x) for x in self.time_step_limit)  # type: ignore[assignment]
        super().__post_init__()

    @property
    def mamba_intermediate_size(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_intermediate_size + 2 * self.mamba_n_groups * self.mamba_d_state

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        super().validate()
        _need_positive_integers(self, ("mamba_n_heads", "mamba_n_groups", "mamba_d_state", "mamba_d_conv",
                                       "mamba_expand", "mamba_chunk_size", "shared_intermediate_size"))
        _need(len(self.layer_types) == self.num_hidden_layers, "layer_types",
              f"has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}")
        for i, t in enumerate(self.layer_types):
            _need(t in _LAYER_ALIASES, f"layer_types[{i}]",
                  f"unknown layer type {t!r}; expected one of {sorted(_LAYER_ALIASES)}")
        self.layer_types = [_LAYER_ALIASES[t] for t in self.layer_types]
        _need(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
              f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        _need(isinstance(self.mamba_d_head, int) and self.mamba_d_head > 0, "mamba_d_head",
              f"must be a positive integer or 'auto', got {self.mamba_d_head!r} "
              f"(mamba_expand * hidden_size = {self.mamba_intermediate_size}, mamba_n_heads = {self.mamba_n_heads})")
        _need(self.mamba_n_heads * self.mamba_d_head == self.mamba_intermediate_size, "mamba_d_head",
              f"mamba_n_heads * mamba_d_head = {self.mamba_n_heads} * {self.mamba_d_head} = "
              f"{self.mamba_n_heads * self.mamba_d_head} must equal mamba_expand * hidden_size = "
              f"{self.mamba_intermediate_size}")
        _need(self.mamba_n_heads % self.mamba_n_groups == 0, "mamba_n_groups",
              f"mamba_n_heads {self.mamba_n_heads} is not divisible by mamba_n_groups {self.mamba_n_groups}")
        _need(self.position_embedding_type in (None, "rope"), "position_embedding_type",
              f"{self.position_embedding_type!r} is not one of None, 'nope', 'rope'")
        if self.position_embedding_type == "rope":
            _need(self.head_dim % 2 == 0, "num_attention_heads", "rope needs an even head dimension")
        _need(isinstance(self.num_local_experts, int) and self.num_local_experts >= 0, "num_local_experts",
              f"must be an integer >= 0, got {self.num_local_experts!r}")
        if self.num_local_experts > 0:
            _need(isinstance(self.intermediate_size, int) and self.intermediate_size > 0, "intermediate_size",
                  f"must be a positive integer for a mixture of experts, got {self.intermediate_size!r}")
            _need(0 < self.num_experts_per_tok <= self.num_local_experts, "num_experts_per_tok",
                  f"{self.num_experts_per_tok} must be between 1 and num_local_experts {self.num_local_experts}")
        lo, hi = self.time_step_limit
        _need(0.0 <= lo <= hi, "time_step_limit",
              f"must be (low, high) with 0 <= low <= high, got {self.time_step_limit}")

    def to_dict(self) -> dict[str, Any]:
        out = self._fields_dict(("mamba_norm_per_group", "time_step_limit"))
        out["position_embedding_type"] = self.position_embedding_type or "nope"
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.time_step_limit != (0.0, math.inf):  # JSON has no infinity: the default is left out
            out["time_step_limit"] = list(self.time_step_limit)
        if not self.mamba_norm_per_group:
            out["mamba_norm_per_group"] = False
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> HybridConfig:
        data = _json_fields(data, MODEL_TYPE, source)
        if "layers_block_type" in data and "layer_types" not in data:
            data["layer_types"] = data.pop("layers_block_type")
        rope = data.pop("rope_parameters", None) or data.pop("rope_scaling", None)
        if isinstance(rope, dict):
            if rope.get("rope_type", "default") not in ("default", None):
                raise ConfigError(f"{source}: rope_parameters.rope_type {rope.get('rope_type')!r} is not supported")
            if "rope_theta" in rope:
                data.setdefault("rope_theta", rope["rope_theta"])
        limit = data.get("time_step_limit")
        if limit is not None:
            if not isinstance(limit, list) or len(limit) != 2:
                raise ConfigError(f"{source}: field 'time_step_limit' must be [low, high], got {limit!r}")
            data["time_step_limit"] = tuple(_json_float(x) for x in limit)
        return _from_fields(cls, data, source)


def _json_float(x: Any) -> float:
    if isinstance(x, dict) and "__float__" in x:  # transformers' encoding of inf/nan
        return float(x["__float__"])
    return float(x)


# ------------------------------------------------------------------------------------------------------------
# Dense Granite (Granite 3.x, Granite 4.1): every layer attention, a plain SwiGLU MLP, RoPE
# ------------------------------------------------------------------------------------------------------------
DENSE_MODEL_TYPE = "granite"
DENSE_ARCHITECTURE = "GraniteForCausalLM"
# RoPE variants whose frequencies do not depend on the sequence length (transformers' "dynamic" and "longrope"
# recompute them per length, which the preallocated decode path does not follow)
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class DenseGraniteConfig(_ConfigJSON):
    """The fields of transformers' ``GraniteConfig`` (``model_type: "granite"``). The in-tree model runs it as an
    all-attention stack of the hybrid's layers, each with ``mlp.{gate,up,down}_proj`` instead of the fused
    ``shared_mlp``. ``attention_dropout`` is read and written back but not applied (training runs without it)."""

    model_type: ClassVar[str] = DENSE_MODEL_TYPE
    architecture: ClassVar[str] = DENSE_ARCHITECTURE
    transformers_class: ClassVar[str] = "GraniteConfig"
    # the rope_parameters besides rope_type "default" and rope_theta (e.g. {"rope_type": "linear", "factor": 2.0})
    rope_scaling: dict[str, Any] | None = None
    attention_dropout: float = 0.0
    mlp_bias: bool = False

    # what the shared layers ask of a config: every layer attention with RoPE, no Mamba, no experts
    position_embedding_type: ClassVar[str] = "rope"
    num_local_experts: ClassVar[int] = 0
    output_router_logits: ClassVar[bool] = False
    router_aux_loss_coef: ClassVar[float] = 0.0

    def __post_init__(self) -> None:
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type", "default") == "default":
            self.rope_scaling = None
        super().__post_init__()

    @property
    def head_dim(self) -> int:
        return int(self.extra.get("head_dim") or self.hidden_size // self.num_attention_heads)

    @property
    def layer_types(self) -> list[str]:
        return ["attention"] * self.num_hidden_layers

    def validate(self) -> None:
        super().validate()
        _need_positive_integers(self, ("intermediate_size",))
        if "head_dim" not in self.extra:
            _need(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
                  f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        _need(self.head_dim % 2 == 0, "head_dim", f"RoPE needs an even head dimension, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            _need(kind in _STATIC_ROPE_TYPES, "rope_parameters.rope_type",
                  f"{kind!r} is not supported; supported: {', '.join(_STATIC_ROPE_TYPES)}")

    def to_dict(self) -> dict[str, Any]:
        out = self._fields_dict(("rope_scaling",))
        out["rope_parameters"] = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> DenseGraniteConfig:
        data = _json_fields(data, DENSE_MODEL_TYPE, source)
        rope = data.pop("rope_parameters", None) or data.pop("rope_scaling", None)
        data.pop("rope_scaling", None)
        if isinstance(rope, dict):
            rope = dict(rope)
            if "type" in rope and "rope_type" not in rope:  # the older spelling
                rope["rope_type"] = rope.pop("type")
            if "rope_theta" in rope:
                data.setdefault("rope_theta", rope.pop("rope_theta"))
            data["rope_scaling"] = rope
        return _from_fields(cls, data, source)


def _read_config_json(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: line {e.lineno}: {e.msg}") from None


IN_TREE_MODEL_TYPES = (MODEL_TYPE, DENSE_MODEL_TYPE)


def load_config(folder: str | Path) -> HybridConfig | DenseGraniteConfig:
    """The config of an in-tree checkpoint folder, of the class its ``model_type`` names."""
    data = _read_config_json(folder)
    source = str(Path(folder) / "config.json")
    kind = data.get("model_type", MODEL_TYPE)
    classes = {MODEL_TYPE: HybridConfig, DENSE_MODEL_TYPE: DenseGraniteConfig}
    if kind not in classes:
        raise ConfigError(f"{source}: model_type {kind!r} is not an in-tree model (those are "
                          f"{', '.join(IN_TREE_MODEL_TYPES)})")
    return classes[kind].from_dict(data, source=source)
