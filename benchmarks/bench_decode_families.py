"""Decode throughput on the transformers families: our engines against transformers' generate, same weights, CPU.

Two measures, each batch 16, 64-token prompts, 128 new tokens, greedy, EOS ignored on both sides, the outputs
checked equal token for token (and not degenerate: every row has several distinct tokens) before any figure is
printed:

- ``decode_transformers_engine_llama``: posttrain's ``TransformersEngine`` (its own decode loop over a preallocated
  ``StaticCache``) on transformers' ``LlamaForCausalLM`` against ``generate`` on the very same module;
- ``decode_native_engine_granite``: the native engine on the in-tree dense Granite against ``generate`` on
  transformers' ``GraniteForCausalLM``, both loaded from one checkpoint that transformers saved.

The models are tiny and shaped like ``posttrain.synthetic.tiny_model``'s (hidden 128, 6 layers, 4 query / 2
key-value heads, the in-tree tokenizer's 512-token vocabulary); the Granite one has Granite 4.1-like multipliers
(embedding 12, residual 0.22, attention 1/head_dim, logits scaling 8). Their weights are transformers' random
initialisation with a larger spread (normal, std 0.2, seeded; norms at 1): with transformers' std 0.02, or even 0.1,
greedy decoding soon repeats a few tokens, with 0.2 every row wanders over dozens (the benchmark checks at least 8
distinct tokens per row), and there is nothing to train. The prompts are the tokenised arithmetic corpus.

Both sides run eagerly under ``torch.inference_mode``, after one warm-up call each (the calls whose outputs are
compared), then alternate for
``--repeats`` rounds; the figure is the best round of each, printed with the median ratio and the machine's load.
``--threads`` sets torch's CPU threads for both sides; ``--batch``, ``--prompt`` and ``--new`` shrink a smoke run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit, machine

from posttrain.models.hybrid import HybridForCausalLM
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.native import NativeEngine
from posttrain.rollout.transformers_engine import TransformersEngine
from posttrain.synthetic import arithmetic_corpus
from posttrain.tokenizer import build_tokenizer

SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 6, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 1024}
GRANITE = {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 1 / 32,
           "logits_scaling": 8.0}


def spread(model, seed: int):
    """Random weights with std 0.2 (norms stay at 1): greedy decoding then wanders instead of repeating a token."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def measure(name: str, ours, anchor, tokens: int, repeats: int, anchor_is: str) -> None:
    out = ours()
    if out != anchor():
        sys.exit(f"{name}: greedy outputs differ between ours and transformers' generate")
    distinct = min(len(set(row)) for row in out)
    if distinct < 8:
        sys.exit(f"{name}: degenerate greedy outputs (a row has only {distinct} distinct tokens)")
    times: dict[str, list[float]] = {"ours": [], "anchor": []}
    load_before = os.getloadavg()[0]
    for _ in range(repeats):  # interleaved rounds
        for side, fn in (("ours", ours), ("anchor", anchor)):
            start = time.perf_counter()
            fn()
            times[side].append(time.perf_counter() - start)
    ratios = [a / o for o, a in zip(times["ours"], times["anchor"])]
    emit(name, tokens / min(times["ours"]), tokens / min(times["anchor"]), "tokens/s", higher_is_better=True,
         anchor_is=anchor_is, median_round_ratio=round(statistics.median(ratios), 3), rounds=repeats,
         min_distinct_tokens_per_row=distinct, ours_s=[round(t, 3) for t in times["ours"]],
         anchor_s=[round(t, 3) for t in times["anchor"]],
         load_1min=[round(load_before, 2), round(os.getloadavg()[0], 2)], machine=machine())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds of both sides")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    batch, prompt_len, new = args.batch, args.prompt, args.new
    texts = arithmetic_corpus(4000, seed=0)
    tokenizer = build_tokenizer(texts, vocab_size=512)
    common = {**SHAPE, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
    stream = [t for text in arithmetic_corpus(200, seed=123) for t in tokenizer(text)["input_ids"]]
    prompts = [stream[i * prompt_len:(i + 1) * prompt_len] for i in range(batch)]
    params = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)

    def generate_with(model):
        def anchor() -> list[list[int]]:
            with torch.inference_mode():
                out = model.generate(torch.tensor(prompts), attention_mask=torch.ones(batch, prompt_len, dtype=torch.long),
                                     max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            return out[:, prompt_len:].tolist()
        return anchor

    # (a) the transformers engine against generate, one Llama module
    llama = spread(LlamaForCausalLM(LlamaConfig(**common, attn_implementation="sdpa")), seed=0)
    llama.generation_config.eos_token_id = None
    engine = TransformersEngine(llama)
    measure(f"decode_transformers_engine_llama_b{batch}_p{prompt_len}_n{new}",
            lambda: [c.token_ids for c in engine.generate(prompts, params)], generate_with(llama),
            batch * new, args.repeats, "transformers generate on the same LlamaForCausalLM (sdpa)")

    # (b) the native engine on the in-tree dense Granite against generate on transformers' Granite, one checkpoint
    theirs = spread(GraniteForCausalLM(GraniteConfig(**common, **GRANITE, attn_implementation="sdpa")), seed=1)
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        ours = HybridForCausalLM.from_pretrained(folder).eval()
    theirs.generation_config.eos_token_id = None
    native = NativeEngine(ours)
    measure(f"decode_native_engine_granite_b{batch}_p{prompt_len}_n{new}",
            lambda: [c.token_ids for c in native.generate(prompts, params)], generate_with(theirs),
            batch * new, args.repeats, "transformers generate on GraniteForCausalLM (sdpa), same checkpoint")


if __name__ == "__main__":
    main()
