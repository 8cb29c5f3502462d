"""GRPO's inputs and the shapes its update runs on: prompt rows (errors name the file and line or the row), their
token ids, their seeded epoch order, and packed micro-batches. This module never touches a model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.jsonl import jsonl_rows
from posttrain.train.data import is_hub_spec, load_hub_dataset

logger = logging.getLogger(__name__)


class PromptDataError(ValueError):
    """A prompt file or row that cannot be used, with where it is."""


def load_prompt_rows(path: str | Path, prompt_column: str = "prompt") -> list[dict[str, Any]]:
    """Rows (dicts) from a JSONL file, a ``datasets`` folder or ``hf:NAME[:CONFIG][@SPLIT]``; each must have
    ``prompt_column``."""
    p = Path(path)
    if is_hub_spec(path):  # hf:NAME[:CONFIG][@SPLIT]
        found = [(f"{path}:row {i + 1}", dict(r)) for i, r in enumerate(load_hub_dataset(str(path), PromptDataError))]
    elif p.is_dir():
        from datasets import load_from_disk

        found = [(f"{p} row {i}", dict(r)) for i, r in enumerate(load_from_disk(str(p)))]
    elif p.is_file():
        found = [(f"{p}:{number}", row) for number, row in jsonl_rows(p, PromptDataError)]
    else:
        raise PromptDataError(f"prompt data not found: {p}")
    for loc, row in found:
        if prompt_column not in row:
            raise PromptDataError(f"{loc}: no {prompt_column!r} column (columns: {sorted(row)})")
        row.setdefault("_where", loc)
    if not found:
        raise PromptDataError(f"{p}: no prompts")
    return [row for _, row in found]


def tokenize_prompts(rows: list[dict[str, Any]], tokenizer, prompt_column: str, max_prompt_tokens: int,
                     long_prompts: str = "error", tools: list[dict[str, Any]] | None = None
                     ) -> tuple[list[dict[str, Any]], list[list[int]], int]:
    """Token ids of every prompt; returns (kept rows, their ids, how many were dropped for length). ``tools``: JSON
    schemas the chat template renders into conversational prompts (multi-turn tool use needs chat messages)."""
    kept, ids, dropped = [], [], 0
    for i, row in enumerate(rows):
        prompt, where = row[prompt_column], row.get("_where", f"row {i}")
        if isinstance(prompt, str) and tools:
            raise PromptDataError(f"{where}: with tools, {prompt_column} must be a list of chat messages (the chat "
                                  "template renders the tools), got a string")
        if isinstance(prompt, str):
            tokens = list(tokenizer.encode(prompt, add_special_tokens=False))
        elif isinstance(prompt, list):
            tokens = list(tokenizer.apply_chat_template(prompt, tools=tools or None, add_generation_prompt=True,
                                                        tokenize=True, return_dict=False))
        else:
            raise PromptDataError(f"{where}: {prompt_column} must be a string or a list of chat messages, got "
                                  f"{type(prompt).__name__}")
        if not tokens:
            raise PromptDataError(f"{where}: the prompt is empty")
        if len(tokens) > max_prompt_tokens:
            if long_prompts == "error":
                raise PromptDataError(f"{where}: prompt of {len(tokens)} tokens is longer than data.max_prompt_tokens="
                                      f"{max_prompt_tokens} (set data.long_prompts: drop to skip such prompts)")
            dropped += 1
            continue
        kept.append(row)
        ids.append(tokens)
    if dropped:
        logger.warning("dropped %d of %d prompts longer than %d tokens", dropped, len(rows), max_prompt_tokens)
    if not kept:
        raise PromptDataError(f"no prompt is at most {max_prompt_tokens} tokens long")
    return kept, ids, dropped


@dataclass
class PromptSampler:
    """Prompt indices in seeded epoch permutations; (epoch, cursor) is its whole state."""

    size: int
    seed: int = 0
    shuffle: bool = True
    epoch: int = 0
    cursor: int = 0

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        return torch.randperm(self.size, generator=torch.Generator(device="cpu").manual_seed(self.seed + epoch),
                             device="cpu").tolist()

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            order = self._order(self.epoch)
            need = n - len(out)
            out += order[self.cursor:self.cursor + need]
            self.cursor += need
            if self.cursor >= self.size:
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def pack_micro_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices grouped into rows of at most ``budget`` tokens (first-fit decreasing; an over-long sequence gets a
    row alone). Rows keep their indices in ascending order."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return [sorted(b) for b in bins]
