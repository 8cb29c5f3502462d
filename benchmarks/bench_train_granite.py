"""Training forward+backward tokens/s at sequence length 2048: dense Granite in-tree (``HybridForCausalLM`` with a
``DenseGraniteConfig``) against transformers' GraniteForCausalLM (sdpa attention), same tiny weights (saved by
transformers, loaded by us), same batch, on the CPU, best of 6 interleaved steps each, at one thread and at torch's default thread count (the
machine may be shared: the load average is printed with the figures)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GraniteConfig, GraniteForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit, machine

from posttrain.models.hybrid import HybridForCausalLM

SEQ, BATCH, REPEATS = 2048, 2, 6
# a tiny dense Granite: GQA, RoPE, Granite's multipliers (the values of a published Granite config's kind)
TINY = {"vocab_size": 2048, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096, "rope_theta": 10000000.0,
        "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0078125,
        "logits_scaling": 8.0, "tie_word_embeddings": True}


def main() -> None:
    torch.manual_seed(0)
    theirs = GraniteForCausalLM(GraniteConfig(**TINY, attn_implementation="sdpa")).float()
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        theirs = GraniteForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").train()
        ours = HybridForCausalLM.from_pretrained(folder).train()
    ids = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ))

    def step_ours() -> float:
        ours.zero_grad(set_to_none=True)
        loss = ours(ids, labels=ids, return_logits=False).loss
        loss.backward()
        return float(loss.detach())

    def step_theirs() -> float:
        theirs.zero_grad(set_to_none=True)
        loss = theirs(input_ids=ids, labels=ids).loss
        loss.backward()
        return float(loss.detach())

    a, b = step_ours(), step_theirs()  # warm-up, and the same loss on the same weights
    assert abs(a - b) < 1e-3, (a, b)
    default_threads = torch.get_num_threads()
    for threads in sorted({1, default_threads}):  # one thread is the figure least moved by a shared machine
        torch.set_num_threads(threads)
        times = {"ours": [], "anchor": []}
        for _ in range(REPEATS):
            for name, fn in (("ours", step_ours), ("anchor", step_theirs)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        tokens = BATCH * SEQ
        emit(f"granite_dense_train_fwd_bwd_tokens_per_s_seq2048_{threads}thread", tokens / min(times["ours"]),
             tokens / min(times["anchor"]), "tokens/s", higher_is_better=True,
             anchor_is="transformers GraniteForCausalLM, attn_implementation=sdpa, CPU", machine=machine(),
             load_average=[round(x, 2) for x in os.getloadavg()])
    torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main()
