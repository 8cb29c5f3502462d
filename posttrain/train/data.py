"""Training data: reading rows, checking them, tokenizing them, packing them, and the order batches are drawn in.

Rows come from JSONL (JSON lines), Parquet, a saved ``datasets`` folder (the output of ``posttrain filter`` reads
straight in) or a data set on the Hugging Face hub named ``hf:NAME[:CONFIG][@SPLIT]`` (``load_hub_dataset``). Three
formats, TRL's: ``messages`` (chat turns, tool calls allowed, optional ``tools``), ``prompt``/``completion``
(strings, or lists of chat turns), and plain ``text`` (pre-training: every token counts).
Every row is checked before any is tokenized, and a bad one raises ``DataError`` naming the file, line and field.
Chat rows go through the tokenizer's chat template; with assistant-only loss the template must mark assistant
turns with ``{% generation %}`` (transformers' ``return_assistant_tokens_mask``), else it is an error.

A tokenized row is a ``Segment`` (input_ids, labels aligned with them, -100 where no loss, and the label of the
first token always -100 so a segment never predicts across its start). An *item* is what the batch plan draws:
one segment (padded batches) or a bin of segments packed best-fit-decreasing by TRL's ``pack_dataset``
(padding-free), collated by ``collate_padded`` or ``collate_packed``; ``BatchPlan`` says which items each process
takes at each step. This module never touches a model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from posttrain.jsonl import jsonl_rows

IGNORE = -100
ROLES = {"system", "user", "assistant", "tool"}
RowFormat = Literal["messages", "prompt_completion", "text"]
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


class DataError(ValueError):
    """A data file or row that cannot be trained on; the message names the file, line and field."""


@dataclass
class Row:
    data: dict[str, Any]
    source: str  # "path:line" (JSONL) or "path:row N"
    index: int  # position among all rows read (the sample id)


@dataclass
class Segment:
    input_ids: list[int]
    labels: list[int]
    sample_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


# -- reading ---------------------------------------------------------------------------------------------------
def read_rows(paths: Sequence[str | os.PathLike], max_rows: int | None = None) -> list[Row]:
    """All rows of the files in order, each tagged with where it came from."""
    if not paths:
        raise DataError("data.train_files is empty: name at least one JSONL/Parquet file or datasets folder")
    rows: list[Row] = []
    for path in paths:
        for source, data in (_iter_hub(str(path)) if is_hub_spec(path) else _iter_file(Path(path))):
            if max_rows is not None and len(rows) >= max_rows:
                return rows
            rows.append(Row(data, source, len(rows)))
    return rows


HUB_PREFIX = "hf:"


def is_hub_spec(path: str | os.PathLike) -> bool:
    """Whether a data path names a data set on the hub (``hf:NAME[:CONFIG][@SPLIT]``) rather than a local file."""
    return str(path).startswith(HUB_PREFIX)


def load_hub_dataset(spec: str, error: type[Exception] = ValueError):
    """``hf:NAME[:CONFIG][@SPLIT]`` (split default ``train``) through ``datasets.load_dataset`` (its cache included).

    Raises ``error`` with one line naming the data set when it cannot be loaded: the hub unreachable, offline mode
    (``HF_HUB_OFFLINE=1``) with nothing cached, an unknown name, config or split.
    """
    body, _, split = spec[len(HUB_PREFIX):].partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise error(f"{spec}: name a data set: hf:NAME[:CONFIG][@SPLIT]")
    import datasets

    try:
        return datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # noqa: BLE001 - connection, offline, not found: all end here, named
        offline = bool(datasets.config.HF_HUB_OFFLINE)
        why = (" (offline: HF_HUB_OFFLINE is set and the data set is not in the local cache)" if offline
               else "")
        detail = " ".join(str(e).split())[:300]
        raise error(f"{spec}: cannot load data set {name!r} from the Hugging Face hub{why}: "
                    f"{type(e).__name__}: {detail}") from None


def _iter_hub(spec: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for i, row in enumerate(load_hub_dataset(spec, DataError)):
        yield f"{spec}:row {i + 1}", row


def _iter_file(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    if path.is_dir():
        try:
            from datasets import load_from_disk

            ds = load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - any failure here means "not a datasets folder"
            raise DataError(f"{path}: not a saved `datasets` folder ({e})") from None
        if hasattr(ds, "keys"):  # a DatasetDict: take the train split
            if "train" not in ds:
                raise DataError(f"{path}: a DatasetDict without a 'train' split (has {', '.join(ds.keys())})")
            ds = ds["train"]
        for i, row in enumerate(ds):
            yield f"{path}:row {i + 1}", row
        return
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row {i + 1}", row
        return
    for lineno, row in jsonl_rows(path, DataError):
        yield f"{path}:{lineno}", row


# -- checking --------------------------------------------------------------------------------------------------
def detect_format(row: Row, wanted: str = "auto", text_field: str = "text") -> RowFormat:
    if wanted != "auto":
        return wanted  # type: ignore[return-value]
    if "messages" in row.data:
        return "messages"
    if "prompt" in row.data and "completion" in row.data:
        return "prompt_completion"
    if text_field in row.data:
        return "text"
    raise DataError(f"{row.source}: the row has none of the fields `messages`, `prompt`+`completion` or "
                    f"`{text_field}` (it has: {', '.join(sorted(row.data)) or 'nothing'})")


def check_messages(messages: Any, where: str, field: str = "messages", need_assistant: bool = False) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field `{field}` must be a non-empty list of chat turns, got {_short(messages)}")
    for i, turn in enumerate(messages):
        at = f"{where}: field `{field}[{i}]`"
        if not isinstance(turn, dict):
            raise DataError(f"{at} must be an object with `role` and `content`, got {_short(turn)}")
        role = turn.get("role")
        if role not in ROLES:
            raise DataError(f"{at}.role must be one of {sorted(ROLES)}, got {_short(role)}")
        content, calls = turn.get("content"), turn.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise DataError(f"{at}.tool_calls: only assistant turns call tools (role is {role!r})")
            if not isinstance(calls, list) or not calls:
                raise DataError(f"{at}.tool_calls must be a non-empty list, got {_short(calls)}")
            for j, call in enumerate(calls):
                fn = call.get("function", call) if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or "arguments" not in fn:
                    raise DataError(f"{at}.tool_calls[{j}] must have a function `name` and `arguments`, "
                                    f"got {_short(call)}")
        if content is None and calls is None:
            raise DataError(f"{at}.content is missing (and the turn calls no tool)")
        if content is not None and not isinstance(content, str):
            raise DataError(f"{at}.content must be a string, got {_short(content)}")
    if need_assistant and not any(t["role"] == "assistant" for t in messages):
        raise DataError(f"{where}: field `{field}` has no assistant turn, so there is nothing to train on")


def check_row(row: Row, fmt: RowFormat, text_field: str, assistant_only: bool) -> None:
    d = row.data
    if fmt == "messages":
        if "messages" not in d:
            raise DataError(f"{row.source}: missing field `messages`")
        check_messages(d["messages"], row.source, need_assistant=assistant_only)
        tools = d.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise DataError(f"{row.source}: field `tools` must be a list of tool specs, got {_short(tools)}")
    elif fmt == "prompt_completion":
        for name in ("prompt", "completion"):
            if name not in d:
                raise DataError(f"{row.source}: missing field `{name}`")
        p, c = d["prompt"], d["completion"]
        if isinstance(p, str) and isinstance(c, str):
            if not c:
                raise DataError(f"{row.source}: field `completion` is empty")
        elif isinstance(p, list) and isinstance(c, list):
            check_messages(p, row.source, "prompt")
            check_messages(c, row.source, "completion", need_assistant=True)
        else:
            raise DataError(f"{row.source}: fields `prompt` and `completion` must both be strings or both be lists "
                            f"of chat turns, got {type(p).__name__} and {type(c).__name__}")
    else:
        text = d.get(text_field)
        if not isinstance(text, str) or not text:
            raise DataError(f"{row.source}: field `{text_field}` must be a non-empty string, got {_short(text)}")


def check_chat_template(tokenizer, source: str = "the tokenizer") -> None:
    """Assistant-only loss needs a chat template whose assistant turns sit in ``{% generation %}`` blocks."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default", "")
    if not template:
        raise DataError(f"{source} has no chat template, so chat rows cannot be rendered")
    if not _GENERATION_TAG.search(template):
        raise DataError(f"{source}: its chat template has no {{% generation %}} block around assistant turns, so "
                        "assistant-only loss cannot tell which tokens to train on; add the markers to the template "
                        "or set data.assistant_only_loss: false")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- tokenizing ------------------------------------------------------------------------------------------------
def tokenize_row(row: Row, fmt: RowFormat, tokenizer, *, text_field: str = "text", assistant_only: bool = True,
                 completion_only: bool = True) -> Segment:
    d = row.data
    if fmt == "text":
        ids = tokenizer(d[text_field], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        mask = [1] * len(ids)
    elif fmt == "messages":
        ids, mask = _render_chat(tokenizer, d["messages"], d.get("tools"), assistant_only)
    elif isinstance(d["prompt"], str):
        prompt = tokenizer(d["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(d["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = prompt + completion
        mask = [0 if completion_only else 1] * len(prompt) + [1] * len(completion)
    else:
        ids, mask = _render_chat(tokenizer, d["prompt"] + d["completion"], d.get("tools"), True)
        if completion_only:  # the prompt's own assistant turns (few-shot) are context, not targets
            n_prompt = len(_render_chat(tokenizer, d["prompt"], d.get("tools"), False)[0])
            mask = [0] * n_prompt + mask[n_prompt:]
        else:
            mask = [1] * len(ids)
    labels = [t if m else IGNORE for t, m in zip(ids, mask)]
    if labels:
        labels[0] = IGNORE  # nothing predicts a segment's first token
    if not any(x != IGNORE for x in labels):
        raise DataError(f"{row.source}: the row has no token to train on after rendering (no assistant tokens?)")
    return Segment(list(ids), labels, row.index)


def _render_chat(tokenizer, messages, tools, assistant_only: bool) -> tuple[list[int], list[int]]:
    out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=assistant_only)
    ids = list(out["input_ids"])
    mask = list(out["assistant_masks"]) if assistant_only else [1] * len(ids)
    return ids, mask


def load_segments(paths: Sequence[str | os.PathLike], tokenizer, *, task: Literal["sft", "pretrain"],
                  fmt: str = "auto", text_field: str = "text", max_length: int = 1024, truncate: bool = True,
                  assistant_only: bool = True, completion_only: bool = True, max_rows: int | None = None,
                  prompt_field: str = "prompt", completion_field: str = "completion") -> list[Segment]:
    """Read, check every row, then tokenize: SFT rows are cut at ``max_length`` (or rejected when ``truncate`` is
    false); pre-training documents are split into ``max_length`` pieces so no token is lost. ``prompt_field`` and
    ``completion_field`` name the prompt/completion columns of data sets that call them otherwise."""
    rows = read_rows(paths, max_rows)
    if (prompt_field, completion_field) != ("prompt", "completion"):
        for row in rows:
            if prompt_field in row.data and completion_field in row.data:
                row.data = {**row.data, "prompt": row.data[prompt_field], "completion": row.data[completion_field]}
    formats = [detect_format(r, fmt, text_field) for r in rows]
    chat = False
    for row, f in zip(rows, formats):
        if task == "pretrain" and f != "text":
            raise DataError(f"{row.source}: pre-training reads plain `{text_field}` rows, this one is {f}")
        check_row(row, f, text_field, assistant_only)
        chat = chat or f == "messages" or (f == "prompt_completion" and isinstance(row.data["prompt"], list))
    if chat:
        if assistant_only:
            check_chat_template(tokenizer)
        elif not tokenizer.chat_template:
            raise DataError("the tokenizer has no chat template, so chat rows cannot be rendered")
    segments: list[Segment] = []
    for row, f in zip(rows, formats):
        seg = tokenize_row(row, f, tokenizer, text_field=text_field, assistant_only=assistant_only,
                           completion_only=completion_only)
        if len(seg) <= max_length:
            segments.append(seg)
        elif task == "pretrain":
            for start in range(0, len(seg), max_length):
                piece = Segment(seg.input_ids[start:start + max_length], seg.labels[start:start + max_length],
                                seg.sample_id)
                piece.labels[0] = IGNORE
                if len(piece) >= 2:
                    segments.append(piece)
        elif truncate:
            cut = Segment(seg.input_ids[:max_length], seg.labels[:max_length], seg.sample_id)
            if cut.n_targets:
                segments.append(cut)
        else:
            raise DataError(f"{row.source}: {len(seg)} tokens, longer than data.max_length {max_length} "
                            "(set data.truncate: true to cut it)")
    if not segments:
        raise DataError("no trainable rows in " + ", ".join(str(p) for p in paths))
    return segments


# -- packing and batching --------------------------------------------------------------------------------------
def pack_segments(segments: Sequence[Segment], max_length: int) -> list[list[Segment]]:
    """Bins of whole segments, each at most ``max_length`` tokens, by TRL's best-fit-decreasing ``pack_dataset``."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    too_long = [s for s in segments if len(s) > max_length]
    if too_long:
        raise ValueError(f"segment of sample {too_long[0].sample_id} has {len(too_long[0])} tokens > {max_length}")
    position = list(range(len(segments)))
    ds = Dataset.from_dict({"input_ids": [s.input_ids for s in segments],
                            "segment": [[i] * len(s) for i, s in zip(position, segments)]})
    packed = pack_dataset(ds, seq_length=max_length, strategy="bfd", map_kwargs={"batch_size": len(segments)})
    bins: list[list[Segment]] = []
    for row in packed:
        starts, bin_ = 0, []
        for n in row["seq_lengths"]:
            bin_.append(segments[row["segment"][starts]])
            starts += n
        bins.append(bin_)
    assert sorted(s.sample_id for b in bins for s in b) == sorted(s.sample_id for s in segments)
    return bins


def collate_packed(items: Sequence[Sequence[Segment]]) -> dict[str, torch.Tensor]:
    """One row holding every segment of the micro-batch; positions restart at 0 at each segment."""
    ids, labels, pos = [], [], []
    for item in items:
        for seg in item:
            ids.extend(seg.input_ids)
            labels.extend(seg.labels)
            pos.extend(range(len(seg)))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([pos])}


def right_pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """The rows as one long tensor, each right-padded with ``value`` to the longest."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def collate_padded(items: Sequence[Sequence[Segment]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One right-padded row per segment, with an attention mask."""
    segs = [seg for item in items for seg in item]
    return {"input_ids": right_pad([s.input_ids for s in segs], pad_token_id),
            "labels": right_pad([s.labels for s in segs], IGNORE),
            "attention_mask": right_pad([[1] * len(s) for s in segs], 0)}


class BatchPlan:
    """Which items each process takes at each optimizer step: a pure function of (seed, step), so that a resumed
    run draws exactly what an uninterrupted one would, and ``world_size * grad_accumulation_steps`` splits of one
    global batch give the same global batch whatever the split.

    An epoch is a permutation of the items (seeded by ``seed`` and the epoch); step ``s`` takes the ``s``-th run of
    ``global_batch`` items in it; the last incomplete run of an epoch is dropped. Micro-batch ``m`` of process
    ``r`` is the ``(m * world_size + r)``-th slice of ``per_device_batch_size`` items.
    """

    def __init__(self, n_items: int, per_device_batch_size: int, grad_accumulation_steps: int, world_size: int,
                 seed: int = 0, shuffle: bool = True):
        self.n_items = n_items
        self.per_device = per_device_batch_size
        self.accum = grad_accumulation_steps
        self.world = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.global_batch = per_device_batch_size * grad_accumulation_steps * world_size
        self.steps_per_epoch = n_items // self.global_batch
        if self.steps_per_epoch < 1:
            raise DataError(f"{n_items} training items cannot fill one global batch of {self.global_batch} "
                            f"(per_device_batch_size {per_device_batch_size} x grad_accumulation_steps "
                            f"{grad_accumulation_steps} x {world_size} processes)")
        self._perm: tuple[int, list[int]] | None = None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _permutation(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(self.n_items, generator=g).tolist()
            else:
                order = list(range(self.n_items))
            self._perm = (epoch, order)
        return self._perm[1]

    def global_indices(self, step: int) -> list[int]:
        perm = self._permutation(self.epoch_of(step))
        start = (step % self.steps_per_epoch) * self.global_batch
        return perm[start:start + self.global_batch]

    def micro_indices(self, step: int, rank: int, micro: int) -> list[int]:
        chunk = micro * self.world + rank
        return self.global_indices(step)[chunk * self.per_device:(chunk + 1) * self.per_device]
