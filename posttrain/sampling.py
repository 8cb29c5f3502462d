"""How completions are sampled: the settings every sampling command shares, declared and checked once.

``SamplingSettings`` is the base of the rollout engines' ``SamplingParams`` (``posttrain.rollout``), of GRPO's
``rollout`` group, of ``posttrain pairs``' ``sampling`` group and of ``posttrain eval``'s ``EvalSampling``: the same
four fields with the same meanings (vLLM's and OpenAI's) and RL's defaults, the untruncated distribution. A subclass
may change a default (evaluation is greedy), never a meaning. This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass
class SamplingSettings:
    max_new_tokens: int = 256  # the most tokens a completion may have
    temperature: float = 1.0  # the softmax temperature; 0 means greedy
    top_p: float = 1.0  # sample from the smallest set of tokens whose probability reaches top_p (1: all of them)
    top_k: int = 0  # sample from the k most likely tokens only (0: no top-k truncation)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def truncated_distribution(self) -> bool:
        """Whether sampling draws from a truncated distribution (top_p < 1 or top_k > 0) when it samples."""
        return self.top_p < 1 or self.top_k > 0

    def sampling_fields(self) -> dict[str, Any]:
        """The four shared fields by name, to build another sampling class from (``SamplingParams(**...)``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingSettings)}
