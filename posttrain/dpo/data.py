"""Preference data: reading ``prompt``/``chosen``/``rejected`` rows, tokenizing them, and collating micro-batches.

Rows are TRL's preference format, read through ``posttrain.train.data.read_rows``. Either all three fields are
strings, or the prompt is a list of chat turns and ``chosen``/``rejected`` are lists of assistant turns (rendered
with the tokenizer's chat template; the completion is what the template adds after the prompt's generation prompt,
up to and including its last EOS token: what a template writes after EOS is never generated). Every row is checked
before any is tokenized; a bad one raises ``DataError`` naming the file, line and field.

A tokenized pair is a ``PreferencePair``: the prompt ids and both completions' ids (each ending with EOS; a chat
row's where its template writes one). ``collate_pairs`` lays a micro-batch out as sequences ``[chosen_0,
rejected_0, chosen_1, ...]``, packed or padded, with where each completion token is predicted from, so the trainer
takes log-probabilities at those positions only. This module never touches a model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.train.data import DataError, Row, check_messages, read_rows, right_pad


@dataclass
class PreferencePair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    pair_id: int  # position among the rows read (the sample id)
    source: str  # "path:line"


def check_preference_row(row: Row, prompt_field: str = "prompt", chosen_field: str = "chosen",
                         rejected_field: str = "rejected") -> bool:
    """Check one row; returns True for a chat row (prompt turns + assistant turns), False for strings.

    A row with ``chosen`` and ``rejected`` but no prompt has an implicit prompt, as TRL reads it: their shared prefix
    (of turns, or of text) becomes the prompt (``trl.data_utils.extract_prompt``), stored in the row.
    """
    d = row.data
    if prompt_field not in d and chosen_field in d and rejected_field in d:
        from trl.data_utils import extract_prompt

        implicit = extract_prompt({"chosen": d[chosen_field], "rejected": d[rejected_field]})
        if not implicit["prompt"]:
            raise DataError(f"{row.source}: no field `{prompt_field}`, and `{chosen_field}` and `{rejected_field}` "
                            "share no prefix to use as the prompt")
        d[prompt_field], d[chosen_field], d[rejected_field] = (implicit["prompt"], implicit["chosen"],
                                                               implicit["rejected"])
    for name in (prompt_field, chosen_field, rejected_field):
        if name not in d:
            raise DataError(f"{row.source}: missing field `{name}` (a preference row needs `{prompt_field}`, "
                            f"`{chosen_field}` and `{rejected_field}`; it has: {', '.join(sorted(d)) or 'nothing'})")
    p, c, r = d[prompt_field], d[chosen_field], d[rejected_field]
    if isinstance(p, str) and isinstance(c, str) and isinstance(r, str):
        for name, value in ((chosen_field, c), (rejected_field, r)):
            if not value:
                raise DataError(f"{row.source}: field `{name}` is empty")
        chat = False
    elif isinstance(p, list) and isinstance(c, list) and isinstance(r, list):
        check_messages(p, row.source, prompt_field)
        for name, value in ((chosen_field, c), (rejected_field, r)):
            check_messages(value, row.source, name, need_assistant=True)
        chat = True
    else:
        raise DataError(f"{row.source}: fields `{prompt_field}`, `{chosen_field}` and `{rejected_field}` must all be "
                        f"strings or all be lists of chat turns, got {type(p).__name__}, {type(c).__name__} and "
                        f"{type(r).__name__}")
    if c == r:
        raise DataError(f"{row.source}: fields `{chosen_field}` and `{rejected_field}` are identical (no preference)")
    return chat


def _chat_completion_ids(tokenizer, prompt: list[dict], completion: list[dict], where: str,
                         field: str) -> tuple[list[int], list[int]]:
    head = list(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
                ["input_ids"])
    full = list(tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"])
    if full[: len(head)] != head:
        raise DataError(f"{where}: field `{field}`: the chat template does not render the prompt as a prefix of "
                        "prompt + completion, so the completion tokens cannot be told apart")
    completion_ids = full[len(head):]
    # the completion ends with the EOS the model generates: what a template writes after it (a newline, the next
    # turn's markup) is never generated and never trained by SFT, so it must not carry the preference
    eos = tokenizer.eos_token_id
    if eos is not None and eos in completion_ids:
        completion_ids = completion_ids[: len(completion_ids) - completion_ids[::-1].index(eos)]
    return head, completion_ids


def tokenize_pair(row: Row, tokenizer, chat: bool, max_length: int, prompt_field: str = "prompt",
                  chosen_field: str = "chosen", rejected_field: str = "rejected") -> PreferencePair:
    d = row.data
    if chat:
        prompt, chosen = _chat_completion_ids(tokenizer, d[prompt_field], d[chosen_field], row.source, chosen_field)
        _, rejected = _chat_completion_ids(tokenizer, d[prompt_field], d[rejected_field], row.source, rejected_field)
    else:
        prompt = tokenizer(d[prompt_field], add_special_tokens=False)["input_ids"]
        chosen = tokenizer(d[chosen_field], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rejected = tokenizer(d[rejected_field], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if not prompt:
        raise DataError(f"{row.source}: field `{prompt_field}` renders to no tokens")
    room = max_length - len(prompt)
    if room < 1:
        raise DataError(f"{row.source}: field `{prompt_field}` has {len(prompt)} tokens, leaving no room for a "
                        f"completion within data.max_length {max_length}")
    return PreferencePair(list(prompt), list(chosen)[:room], list(rejected)[:room], row.index, row.source)


def load_pairs(paths: Sequence[str | os.PathLike], tokenizer, *, max_length: int, max_rows: int | None = None,
               prompt_field: str = "prompt", chosen_field: str = "chosen",
               rejected_field: str = "rejected") -> list[PreferencePair]:
    """Read every row, check them all, then tokenize."""
    rows = read_rows(paths, max_rows)
    kinds = [check_preference_row(r, prompt_field, chosen_field, rejected_field) for r in rows]
    if any(kinds) and not tokenizer.chat_template:
        raise DataError("the tokenizer has no chat template, so chat preference rows cannot be rendered")
    return [tokenize_pair(r, tokenizer, chat, max_length, prompt_field, chosen_field, rejected_field)
            for r, chat in zip(rows, kinds)]


# -- collating -------------------------------------------------------------------------------------------------
def collate_pairs(pairs: Sequence[PreferencePair], packed: bool, pad_token_id: int = 0) -> dict[str, Any]:
    """Model inputs for the pairs' 2N sequences (each fed without its last token) and the completion targets.

    Returns ``input_ids`` and either ``position_ids`` (packed: one row) or ``attention_mask`` (padded rows),
    ``target_index`` (flat positions in the (rows * length) grid whose output predicts a completion token),
    ``targets`` (those tokens), ``target_seq`` (the sequence each target belongs to), ``n_seqs`` and ``lengths``
    (completion tokens per sequence).
    """
    seqs = [(p.prompt_ids, completion) for p in pairs for completion in (p.chosen_ids, p.rejected_ids)]
    inputs = [(prompt + completion)[:-1] for prompt, completion in seqs]
    width = sum(len(x) for x in inputs) if packed else max(len(x) for x in inputs)
    index, targets, seq_of = [], [], []
    offset = 0
    for i, ((prompt, completion), fed) in enumerate(zip(seqs, inputs)):
        start = (offset if packed else i * width) + len(prompt) - 1
        index.extend(range(start, start + len(completion)))
        targets.extend(completion)
        seq_of.extend([i] * len(completion))
        offset += len(fed)
    batch: dict[str, Any] = {}
    if packed:
        batch["input_ids"] = torch.tensor([[t for x in inputs for t in x]])
        batch["position_ids"] = torch.tensor([[j for x in inputs for j in range(len(x))]])
    else:
        batch["input_ids"] = right_pad(inputs, pad_token_id)
        batch["attention_mask"] = right_pad([[1] * len(x) for x in inputs], 0)
    batch["target_index"] = torch.tensor(index)
    batch["targets"] = torch.tensor(targets)
    batch["target_seq"] = torch.tensor(seq_of)
    batch["n_seqs"] = len(seqs)
    batch["lengths"] = torch.tensor([len(c) for _, c in seqs], dtype=torch.float32)
    return batch
