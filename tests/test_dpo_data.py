"""Preference rows: bad input is a clear error naming file, line and field; packed and padded micro-batches give the
same log-probabilities as scoring each sequence alone."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.dpo.data import collate_pairs, load_pairs
from posttrain.dpo.trainer import pair_logps, sequence_logps
from posttrain.models.hybrid import HybridForCausalLM, preset
from posttrain.synthetic import arithmetic_corpus
from posttrain.tokenizer import build_tokenizer
from posttrain.train.data import DataError


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(arithmetic_corpus(200), vocab_size=300)


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"prompt": "Question: 2 + 3?\nAnswer:", "chosen": " 5", "rejected": " 6"}


def test_bad_rows_name_file_line_and_field(tmp_path, tokenizer):
    f = write(tmp_path / "missing.jsonl", [GOOD, {"prompt": "Question: 1 + 1?", "rejected": " 3"}])
    with pytest.raises(DataError, match=rf"{f}:2: missing field `chosen`"):
        load_pairs([f], tokenizer, max_length=64)
    f = write(tmp_path / "broken.jsonl", [GOOD, GOOD, '{"prompt": "x", "chosen": '])
    with pytest.raises(DataError, match=rf"{f}:3: not valid JSON"):
        load_pairs([f], tokenizer, max_length=64)
    f = write(tmp_path / "mixed.jsonl", [{"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}],
                                          "rejected": "b"}])
    with pytest.raises(DataError, match=rf"{f}:1: fields `prompt`, `chosen` and `rejected` must all be strings"):
        load_pairs([f], tokenizer, max_length=64)
    f = write(tmp_path / "same.jsonl", [{"prompt": "q", "chosen": " a", "rejected": " a"}])
    with pytest.raises(DataError, match=rf"{f}:1: fields `chosen` and `rejected` are identical"):
        load_pairs([f], tokenizer, max_length=64)
    f = write(tmp_path / "turns.jsonl", [{"prompt": [{"role": "user", "content": "hi"}],
                                         "chosen": [{"role": "robot", "content": "a"}],
                                         "rejected": [{"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match=rf"{f}:1: field `chosen\[0\]`\.role must be one of"):
        load_pairs([f], tokenizer, max_length=64)
    with pytest.raises(DataError, match="leaving no room for a completion within data.max_length 3"):
        load_pairs([write(tmp_path / "long.jsonl", [GOOD])], tokenizer, max_length=3)


def test_string_and_chat_rows_tokenize_to_prompt_and_completions(tmp_path, tokenizer):
    chat = {"prompt": [{"role": "user", "content": "What is 2 + 3?"}],
            "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "6"}]}
    pairs = load_pairs([write(tmp_path / "rows.jsonl", [GOOD, chat])], tokenizer, max_length=64)
    plain, turns = pairs
    assert tokenizer.decode(plain.prompt_ids) == GOOD["prompt"]
    assert tokenizer.decode(plain.chosen_ids) == " 5" + tokenizer.eos_token
    assert plain.chosen_ids[:-1] != plain.rejected_ids[:-1]
    full = tokenizer.apply_chat_template(chat["prompt"] + chat["chosen"], tokenize=True, return_dict=True)["input_ids"]
    assert turns.prompt_ids + turns.chosen_ids == list(full)[: len(turns.prompt_ids) + len(turns.chosen_ids)]
    assert "5" in tokenizer.decode(turns.chosen_ids) and "6" in tokenizer.decode(turns.rejected_ids)
    cut = load_pairs([write(tmp_path / "cut.jsonl", [GOOD])], tokenizer, max_length=len(plain.prompt_ids) + 1)[0]
    assert cut.prompt_ids == plain.prompt_ids and len(cut.chosen_ids) == 1  # completions are cut, never the prompt


def test_chat_completions_end_at_the_eos_the_model_generates(tmp_path, tokenizer):
    """The template writes a newline after an assistant turn's EOS; generation stops at EOS, so the completion is
    the answer's tokens and EOS, nothing after it (checked against tokenizing the answer text on its own)."""
    call = {"type": "function", "function": {"name": "multiply", "arguments": {"a": 4, "b": 6}}}
    rows = [{"prompt": [{"role": "user", "content": "What is 2 + 3?"}],
             "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "16"}]},
            {"prompt": [{"role": "system", "content": "tool: multiply"}, {"role": "user", "content": "4*6="}],
             "chosen": [{"role": "assistant", "content": "", "tool_calls": [call]}],
             "rejected": [{"role": "assistant", "content": "24"}]}]
    rendered = tokenizer.apply_chat_template(rows[0]["prompt"] + rows[0]["chosen"], tokenize=False)
    assert rendered.endswith(tokenizer.eos_token + "\n")  # the template does write past EOS
    add, tool = load_pairs([write(tmp_path / "chat.jsonl", rows)], tokenizer, max_length=128)
    eos = tokenizer.eos_token_id

    def alone(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]

    assert add.chosen_ids == alone("5") and add.rejected_ids == alone("16")
    assert tool.chosen_ids == alone('<tool_call>{"name": "multiply", "arguments": {"a": 4, "b": 6}}</tool_call>')
    assert tool.rejected_ids == alone("24")
    for ids in (add.chosen_ids, add.rejected_ids, tool.chosen_ids, tool.rejected_ids):
        assert ids[-1] == eos and ids.count(eos) == 1
    head = tokenizer.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
    assert add.prompt_ids == list(head)


def test_packed_and_padded_batches_score_like_single_sequences(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = HybridForCausalLM(preset("tiny", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id, bos_token_id=None)).eval()
    rows = [GOOD, {"prompt": "Question: Ada has 12 coins and gets 30 more. How many?\nAnswer:",
                   "chosen": " Ada has 12 + 30 = 42 coins.\n#### 42", "rejected": " 12 - 30 = -18\n#### -18"}]
    pairs = load_pairs([write(tmp_path / "rows.jsonl", rows)], tokenizer, max_length=64)
    with torch.no_grad():
        packed = pair_logps(*_scored(model, pairs, True))
        padded = pair_logps(*_scored(model, pairs, False))
        for i, p in enumerate(pairs):
            for which, completion in (("chosen", p.chosen_ids), ("rejected", p.rejected_ids)):
                ids = torch.tensor([p.prompt_ids + completion])
                logits = model(ids).logits[0, len(p.prompt_ids) - 1:-1].double()
                alone = torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None]).sum()
                assert getattr(packed, which)[i].item() == pytest.approx(alone.item(), abs=2e-4), (i, which)
                assert getattr(padded, which)[i].item() == pytest.approx(alone.item(), abs=2e-4), (i, which)
    assert packed.chosen_tokens.tolist() == [len(p.chosen_ids) for p in pairs]


def _scored(model, pairs, packed):
    batch = collate_pairs(pairs, packed, pad_token_id=0)
    return sequence_logps(model, batch, torch.device("cpu"))[0], batch["lengths"]


def test_a_transformers_model_is_scored_through_its_logits_on_padded_rows(tmp_path, tokenizer):
    from transformers import GraniteMoeHybridForCausalLM

    torch.manual_seed(1)
    ours = HybridForCausalLM(preset("tiny", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id, bos_token_id=None)).eval()
    ours.save_pretrained(tmp_path / "m")
    theirs = GraniteMoeHybridForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).eval()
    rows = [GOOD, {"prompt": "Question: 7 - 2?\nAnswer:", "chosen": " 7 - 2 = 5\n#### 5", "rejected": " 9"}]
    pairs = load_pairs([write(tmp_path / "rows.jsonl", rows)], tokenizer, max_length=64)
    with torch.no_grad():
        packed = pair_logps(*_scored(ours, pairs, True))
        padded = pair_logps(*_scored(theirs, pairs, False))
    torch.testing.assert_close(padded.chosen, packed.chosen, atol=2e-4, rtol=0)
    torch.testing.assert_close(padded.rejected, packed.rejected, atol=2e-4, rtol=0)
