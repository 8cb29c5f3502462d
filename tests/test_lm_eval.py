"""lm-eval's ``local-completions`` model scoring a multiple-choice task against ``posttrain serve``.

A tiny dense Granite (served by the native engine) is briefly trained on the arithmetic corpus and saved with the
in-tree tokenizer; ``posttrain serve`` serves it on 127.0.0.1, and the ``lm_eval`` command line runs
tests/data/lm_eval/arithmetic_choice.yaml against it, offline, with the checkpoint's own tokenizer. lm-eval sends
each (context, choice) as token ids with ``echo``, ``logprobs: 1`` and ``max_tokens: 1``, and sums the prompt's
token logprobs after the context. Every logged loglikelihood must equal transformers' log-softmax on the same
weights to 1e-4, and the accuracy lm-eval reports must be the one those reference loglikelihoods imply.

lm-eval (``lm_eval[api]``) is part of the ``test`` extra; without it the test is skipped, except under .ci/run
(``POSTTRAIN_EXPECT_INSTALLED=1``), where it is installed and its absence is a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GraniteConfig

from posttrain.synthetic import arithmetic_corpus
from posttrain.tokenizer import build_tokenizer

TASK_DIR = Path(__file__).resolve().parent / "data" / "lm_eval"
TASK = "posttrain_arithmetic_choice"
SERVED_NAME = "tiny-granite"
TOLERANCE = 1e-4

# .ci/run installs the test extra (POSTTRAIN_EXPECT_INSTALLED=1): there a missing lm-eval fails the test instead
NO_LM_EVAL = importlib.util.find_spec("lm_eval") is None and os.environ.get("POSTTRAIN_EXPECT_INSTALLED") != "1"

pytestmark = [
    pytest.mark.skipif(NO_LM_EVAL, reason="lm-eval is not installed (pip install 'lm_eval[api]', or the "
                                                "project's `test` extra)"),
    pytest.mark.usefixtures("one_thread"),  # tests/conftest.py
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A dense Granite trained for 40 steps on the arithmetic corpus, so that the choices' loglikelihoods differ by
    far more than the tolerance, saved with its tokenizer."""
    torch.manual_seed(0)
    texts = arithmetic_corpus(2000)
    tokenizer = build_tokenizer(texts, vocab_size=400)
    config = GraniteConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = AutoModelForCausalLM.from_config(config).float()
    stream = [t for text in texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    rows = torch.tensor(stream[: len(stream) // 64 * 64]).view(-1, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        batch = rows[torch.randint(0, rows.shape[0], (16,), generator=generator)]
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("lm_eval_ckpt") / SERVED_NAME
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server_url(checkpoint):
    """``posttrain serve`` on a free port of 127.0.0.1; yields its base URL (``http://127.0.0.1:PORT/v1``)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "posttrain.cli", "serve", "--model", str(checkpoint), "--port", "0", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert found, f"posttrain serve printed {line!r}, not its URL; stderr:\n{proc.stderr.read()}"
        yield found.group(0) + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_lm_eval(checkpoint: Path, server_url: str, workdir: Path) -> subprocess.CompletedProcess:
    """The ``lm_eval`` command line on the task, its samples and results written under ``workdir / "out"``."""
    model_args = ",".join([
        f"model={SERVED_NAME}", f"base_url={server_url}/completions", "tokenizer_backend=huggingface",
        f"tokenizer={checkpoint}", "tokenized_requests=True", "num_concurrent=1", "max_retries=1",
    ])
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_DATASETS_CACHE": str(workdir / "datasets")}
    # The task's data_files path is relative to the working directory: lm-eval runs from the task's folder.
    return subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
         "--tasks", TASK, "--include_path", str(TASK_DIR), "--log_samples", "--output_path", str(workdir / "out")],
        cwd=TASK_DIR, env={**os.environ, **offline}, capture_output=True, text=True, timeout=600, check=False)


def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log p(continuation token | everything before it), and whether each is the argmax, from transformers.
    Tokenised as lm-eval does for causal models: the whole text at once, split after the context's tokens (the
    context's trailing spaces move to the continuation)."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    assert ids[: len(context_ids)] == context_ids, "the context's tokens change when the continuation follows"
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    targets = torch.tensor(ids[len(context_ids):])
    rows = logprobs[len(context_ids) - 1: len(ids) - 1]
    return rows.gather(1, targets[:, None]).sum().item(), bool((rows.argmax(dim=1) == targets).all())


def test_lm_eval_loglikelihoods_match_transformers(checkpoint, server_url, tmp_path):
    result = run_lm_eval(checkpoint, server_url, tmp_path)
    assert result.returncode == 0, f"lm_eval exited {result.returncode}:\n{result.stderr[-6000:]}"
    (samples_file,) = (tmp_path / "out").glob(f"*/samples_{TASK}_*.jsonl")
    (results_file,) = (tmp_path / "out").glob("*/results_*.json")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    documents = [json.loads(line) for line in (TASK_DIR / "arithmetic_choice.jsonl").read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(documents)))

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    correct = 0
    for sample in samples:
        doc = documents[sample["doc_id"]]
        arguments = [sample["arguments"][f"gen_args_{i}"] for i in range(len(doc["choices"]))]
        assert [a["arg_1"] for a in arguments] == [" " + c for c in doc["choices"]]
        served = [(float(ll), greedy == "True") for ll, greedy in sample["filtered_resps"]]
        expected = [reference_loglikelihood(model, tokenizer, a["arg_0"], a["arg_1"]) for a in arguments]
        for (got, got_greedy), (want, want_greedy), choice in zip(served, expected, doc["choices"], strict=True):
            assert abs(got - want) <= TOLERANCE, f"doc {sample['doc_id']} choice {choice!r}: {got} != {want}"
            assert got_greedy == want_greedy, f"doc {sample['doc_id']} choice {choice!r}: is_greedy {got_greedy}"
        lls = sorted(ll for ll, _ in expected)
        assert lls[-1] - lls[-2] > 10 * TOLERANCE, f"doc {sample['doc_id']}: the best two choices nearly tie"
        right = max(range(len(expected)), key=lambda i: expected[i][0]) == doc["label"]
        assert sample["acc"] == float(right)
        correct += right
    accuracy = json.loads(results_file.read_text())["results"][TASK]["acc,none"]
    assert accuracy == pytest.approx(correct / len(documents))
