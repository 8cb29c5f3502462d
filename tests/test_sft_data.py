"""SFT/pre-training data: formats, assistant-only masks, clear errors for bad rows, packing, the batch plan,
schedules and recipe errors. No model is trained here."""

from __future__ import annotations

import json
import math

import pytest

from posttrain.config import ConfigError, load_config
from posttrain.synthetic import arithmetic_corpus
from posttrain.tokenizer import build_tokenizer
from posttrain.train.config import TrainConfig
from posttrain.train.data import (
    IGNORE,
    BatchPlan,
    DataError,
    collate_packed,
    collate_padded,
    load_segments,
    pack_segments,
)
from posttrain.train.schedules import lr_lambda


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(arithmetic_corpus(300) + ["tool call weather city Paris sunny"], vocab_size=320)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


TOOL_ROW = {
    "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
    "messages": [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ],
}


def targets_text(tok, seg):
    return tok.decode([t for t in seg.labels if t != IGNORE])


def test_messages_with_tool_calls_train_on_assistant_tokens_only(tmp_path, tok):
    f = write_jsonl(tmp_path / "chat.jsonl", [TOOL_ROW])
    (seg,) = load_segments([f], tok, task="sft")
    assert targets_text(tok, seg) == (
        '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call><|end_of_text|>'
        "It is sunny.<|end_of_text|>")
    # the whole rendering is the chat template's, tools included
    rendered = tok.apply_chat_template(TOOL_ROW["messages"], tools=TOOL_ROW["tools"], tokenize=False)
    assert tok.decode(seg.input_ids) == rendered
    assert seg.labels[0] == IGNORE and len(seg.labels) == len(seg.input_ids)


def test_prompt_completion_and_text_rows(tmp_path, tok):
    f = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Ada has 3 apples.", "completion": " 3"}])
    (seg,) = load_segments([f], tok, task="sft")
    assert targets_text(tok, seg) == " 3<|end_of_text|>"
    (full,) = load_segments([f], tok, task="sft", completion_only=False)
    assert full.n_targets == len(full) - 1  # everything but the first token
    conv = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "4"}]}
    (seg,) = load_segments([write_jsonl(tmp_path / "conv.jsonl", [conv])], tok, task="sft")
    assert targets_text(tok, seg) == "4<|end_of_text|>"
    t = write_jsonl(tmp_path / "text.jsonl", [{"text": "Ben has 12 coins."}])
    (seg,) = load_segments([t], tok, task="pretrain")
    assert seg.n_targets == len(seg) - 1 and seg.input_ids[-1] == tok.eos_token_id


def test_pretraining_splits_long_documents_without_losing_tokens(tmp_path, tok):
    text = " ".join(arithmetic_corpus(20))
    t = write_jsonl(tmp_path / "long.jsonl", [{"text": text}])
    pieces = load_segments([t], tok, task="pretrain", max_length=64)
    whole = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert [x for p in pieces for x in p.input_ids] == whole[: sum(len(p) for p in pieces)]
    assert all(len(p) <= 64 for p in pieces) and len(whole) - sum(len(p) for p in pieces) < 2


@pytest.mark.parametrize("row, where, words", [
    ('{"messages": [', ":2:", "not valid JSON"),
    ({"question": "x"}, ":2:", "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, ":2:", "messages[0]`.role"),
    ({"messages": [{"role": "user", "content": "x"}]}, ":2:", "no assistant turn"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, ":2:", ".content"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"function": {}}]}]},
     ":2:", "tool_calls[0]"),
    ({"prompt": "x", "completion": ["y"]}, ":2:", "both be strings"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, tok, row, where, words):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    f = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError) as e:
        load_segments([f], tok, task="sft")
    assert f"bad.jsonl{where}" in str(e.value) and words in str(e.value)


def test_pretraining_rejects_chat_rows_and_missing_files(tmp_path, tok):
    f = write_jsonl(tmp_path / "chat.jsonl", [TOOL_ROW])
    with pytest.raises(DataError, match=r"chat.jsonl:1: pre-training reads plain `text` rows"):
        load_segments([f], tok, task="pretrain")
    with pytest.raises(DataError, match="data file not found"):
        load_segments([tmp_path / "nope.jsonl"], tok, task="sft")


def test_template_without_generation_marks_is_an_error_for_assistant_only_loss(tmp_path, tok):
    plain = build_tokenizer(arithmetic_corpus(50), vocab_size=280)
    plain.chat_template = plain.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    f = write_jsonl(tmp_path / "chat.jsonl", [TOOL_ROW])
    with pytest.raises(DataError, match=r"no \{% generation %\} block"):
        load_segments([f], plain, task="sft")
    (seg,) = load_segments([f], plain, task="sft", assistant_only=False)
    assert seg.n_targets == len(seg) - 1


def test_too_long_rows_error_when_truncation_is_off(tmp_path, tok):
    f = write_jsonl(tmp_path / "chat.jsonl", [TOOL_ROW])
    with pytest.raises(DataError, match=r"chat.jsonl:1: \d+ tokens, longer than data.max_length 16"):
        load_segments([f], tok, task="sft", max_length=16, truncate=False)


def test_datasets_folder_reads_like_jsonl(tmp_path, tok):
    from datasets import Dataset

    rows = [{"prompt": f"q{i}", "completion": f" {i}"} for i in range(5)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    a = load_segments([tmp_path / "ds"], tok, task="sft")
    b = load_segments([write_jsonl(tmp_path / "rows.jsonl", rows)], tok, task="sft")
    assert [s.input_ids for s in a] == [s.input_ids for s in b]


def test_best_fit_decreasing_packing_keeps_every_sequence_once(tmp_path, tok):
    rows = [{"text": t} for t in arithmetic_corpus(60)]
    segs = load_segments([write_jsonl(tmp_path / "t.jsonl", rows)], tok, task="pretrain", max_length=128)
    bins = pack_segments(segs, 128)
    assert sorted(s.sample_id for b in bins for s in b) == list(range(60))
    assert all(sum(len(s) for s in b) <= 128 for b in bins)
    total = sum(len(s) for s in segs)
    assert total / (len(bins) * 128) > 0.9 and len(bins) <= math.ceil(total / 128) + 1
    batch = collate_packed(bins[:2])
    n = sum(len(s) for b in bins[:2] for s in b)
    assert batch["input_ids"].shape == (1, n)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == sum(len(b) for b in bins[:2])
    assert all(batch["labels"][0, i] == IGNORE for i in starts)  # nothing predicted across a boundary
    padded = collate_padded([[s] for s in segs[:3]], tok.pad_token_id)
    assert padded["input_ids"].shape[0] == 3 and int(padded["attention_mask"].sum()) == sum(len(s) for s in segs[:3])


def test_batch_plan_is_independent_of_the_split_and_covers_each_epoch_once():
    one = BatchPlan(50, per_device_batch_size=4, grad_accumulation_steps=1, world_size=1, seed=3)
    split = BatchPlan(50, per_device_batch_size=1, grad_accumulation_steps=2, world_size=2, seed=3)
    for step in range(30):
        assert one.global_indices(step) == split.global_indices(step)
        parts = [split.micro_indices(step, r, m) for m in range(2) for r in range(2)]
        assert sorted(i for part in parts for i in part) == sorted(one.global_indices(step))
    epoch0 = [i for s in range(one.steps_per_epoch) for i in one.global_indices(s)]
    assert len(set(epoch0)) == len(epoch0) == 48
    assert one.global_indices(0) != one.global_indices(one.steps_per_epoch)  # reshuffled next epoch
    with pytest.raises(DataError, match="cannot fill one global batch"):
        BatchPlan(3, 2, 1, 2)


def test_schedules():
    cos = lr_lambda("cosine", total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert cos(0) == pytest.approx(1 / 11) and cos(10) == pytest.approx(1.0)
    assert cos(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cos(100) == pytest.approx(0.1)
    wsd = lr_lambda("wsd", total_steps=100, warmup_steps=10, decay_fraction=0.2)
    assert [wsd(s) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert wsd(90) == pytest.approx(0.5) and wsd(100) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_lambda("cosine", total_steps=5, warmup_steps=6)


def test_recipe_errors_name_file_and_field(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("model: {preset: tiny, tokenizer: t}\noptim: {lr: fast}\n")
    with pytest.raises(ConfigError, match=r"r.yaml: optim.lr must be a number"):
        load_config(TrainConfig, bad)
    bad.write_text("model: {preset: tiny, tokenizer: t}\ndata: {packed: true}\n")
    with pytest.raises(ConfigError, match=r"unknown field data.packed"):
        load_config(TrainConfig, bad)
    bad.write_text("model: {tokenizer: t}\n")
    with pytest.raises(ConfigError, match=r"model.path .* or model.preset"):
        load_config(TrainConfig, bad)


def test_filter_output_reads_straight_in_with_its_manifest(tmp_path, tok):
    from posttrain.judges.pipeline import RESULT_COLUMN

    from posttrain.provenance import data_provenance

    kept = {**TOOL_ROW, RESULT_COLUMN: {"kept": True, "stage": None, "reasons": ["passed all filters"]}}
    f = write_jsonl(tmp_path / "kept.jsonl", [kept])
    (tmp_path / "manifest.json").write_text('{"counts": {"kept": 1}}\n')
    (seg,) = load_segments([f], tok, task="sft")
    assert targets_text(tok, seg).endswith("It is sunny.<|end_of_text|>")
    prov = data_provenance(str(f))
    assert prov["manifest"].endswith("manifest.json") and len(prov["manifest_sha256"]) == 64
