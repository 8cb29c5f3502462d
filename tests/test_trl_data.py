"""TRL's data conveniences: preference rows with an implicit prompt (the shared prefix of ``chosen`` and ``rejected``,
as TRL's ``extract_prompt`` reads it), and data sets named on the hub (``hf:NAME[:CONFIG][@SPLIT]``), which without
a reachable hub are one clear error naming the data set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.dpo.data import load_pairs
from posttrain.train.data import DataError, read_rows

REPO = Path(__file__).resolve().parent.parent


class _ByteTokenizer:
    """Ids are the text's bytes (EOS 0): enough to see which text ended up in the prompt and which in a completion."""

    eos_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}


def _decode(ids: list[int]) -> str:
    return bytes(i for i in ids if i).decode()


def test_implicit_prompt_string_rows(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"chosen": "Q: What color is the sky?\nA: It is blue.", "rejected": "Q: What color is the sky?\nA: Green."},
            {"prompt": "explicit ", "chosen": "yes", "rejected": "no"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_pairs([data], _ByteTokenizer(), max_length=200)
    assert _decode(pairs[0].prompt_ids) == "Q: What color is the sky?\nA:"
    assert _decode(pairs[0].chosen_ids) == " It is blue." and _decode(pairs[0].rejected_ids) == " Green."
    assert pairs[0].chosen_ids[-1] == 0  # completions still end with EOS
    assert _decode(pairs[1].prompt_ids) == "explicit " and _decode(pairs[1].chosen_ids) == "yes"


def test_implicit_prompt_chat_rows_split_at_the_shared_turns(tmp_path):
    from posttrain.dpo.data import check_preference_row

    sky = {"role": "user", "content": "What color is the sky?"}
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"chosen": [sky, {"role": "assistant", "content": "It is blue."}],
                                "rejected": [sky, {"role": "assistant", "content": "It is green."}]}) + "\n")
    row = read_rows([data])[0]
    assert check_preference_row(row) is True
    assert row.data == {"prompt": [sky], "chosen": [{"role": "assistant", "content": "It is blue."}],
                        "rejected": [{"role": "assistant", "content": "It is green."}]}


def test_implicit_prompt_without_a_shared_prefix_names_the_row(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"chosen": "abc", "rejected": "xyz"}) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: no field `prompt`.*share no prefix"):
        load_pairs([data], _ByteTokenizer(), max_length=50)


def test_hub_dataset_offline_is_one_clear_error(tmp_path, _tokenizer_folder):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_DATASETS_CACHE", None)
    spec = "hf:posttrain-test/no-such-set:main@train"
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "sft", "--config", "recipes/sft_tiny.yaml",
                           "--model.path", "null", "--model.preset", "tiny",
                           "--model.tokenizer", str(tmp_path / "tok"), "--data.train_files", json.dumps([spec]),
                           "--checkpoint.output_dir", str(tmp_path / "run")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    # the tokenizer folder is built first so that the data set is what fails
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert err[0].startswith(f"posttrain sft: {spec}: cannot load data set 'posttrain-test/no-such-set'")
    assert "offline" in err[0]


@pytest.fixture()
def _tokenizer_folder(tmp_path):
    from posttrain.tokenizer import build_tokenizer

    build_tokenizer(["one two three"], vocab_size=300).save_pretrained(str(tmp_path / "tok"))


def test_grpo_hub_prompts_offline_is_one_clear_error(tmp_path):
    from posttrain.models.hybrid import HybridForCausalLM, preset
    from posttrain.tokenizer import build_tokenizer

    tok = build_tokenizer(["1+1=2"], vocab_size=270)
    HybridForCausalLM(preset("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, bos_token_id=None)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(str(tmp_path / "m"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_DATASETS_CACHE", None)
    spec = "hf:posttrain-test/no-such-prompts@test"
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "grpo", "--config", "recipes/grpo_dapo.yaml",
                           "--model.path", str(tmp_path / "m"), "--data.path", spec, "--eval.path", "",
                           "--checkpoint.output_dir", str(tmp_path / "run")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [line for line in proc.stderr.strip().splitlines() if line.startswith("posttrain grpo:")]
    assert len(err) == 1 and err == proc.stderr.strip().splitlines()[-1:], proc.stderr
    assert err[0].startswith(f"posttrain grpo: {spec}: cannot load data set 'posttrain-test/no-such-prompts'")
    assert "offline" in err[0]
