"""Training forward+backward tokens/s at sequence length 2048: the in-tree hybrid against transformers'
GraniteMoeHybridForCausalLM (its CPU torch path), same tiny weights, same batch, on the CPU."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GraniteMoeHybridForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit, machine

from posttrain.models.hybrid import HybridForCausalLM, preset

SEQ, BATCH, REPEATS = 2048, 2, 3


def main() -> None:
    torch.manual_seed(0)
    ours = HybridForCausalLM(preset("tiny")).train()
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder)
        theirs = GraniteMoeHybridForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    ids = torch.randint(0, ours.config.vocab_size, (BATCH, SEQ))

    def step_ours() -> float:
        ours.zero_grad(set_to_none=True)
        loss = ours(ids, labels=ids, return_logits=False).loss
        loss.backward()
        return float(loss)

    def step_theirs() -> float:
        theirs.zero_grad(set_to_none=True)
        loss = theirs(input_ids=ids, labels=ids).loss
        loss.backward()
        return float(loss)

    a, b = step_ours(), step_theirs()  # warm-up, and the same loss on the same weights
    assert abs(a - b) < 1e-3, (a, b)
    times = {"ours": [], "anchor": []}
    for _ in range(REPEATS):
        for name, fn in (("ours", step_ours), ("anchor", step_theirs)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    tokens = BATCH * SEQ
    emit("train_fwd_bwd_tokens_per_s_seq2048", tokens / min(times["ours"]), tokens / min(times["anchor"]),
         "tokens/s", higher_is_better=True, anchor_is="transformers GraniteMoeHybrid CPU path", machine=machine())


if __name__ == "__main__":
    main()
