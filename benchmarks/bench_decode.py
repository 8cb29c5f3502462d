"""Decode throughput: the native engine against transformers' generate, same tiny trained weights, on the CPU.

Batch 16, 64-token prompts, 128 new tokens, greedy, EOS ignored on both sides; the outputs are checked equal
token for token before any figure is printed. Both sides run eagerly (no torch.compile: on this CPU it took
minutes to compile the step and saved about 20%) and under ``torch.inference_mode`` (the engine decodes under it;
transformers' generate gains little from it, but it is given the same), after one warm-up call each, then alternate
for ``--repeats`` rounds; the figure is the best round of each, and the median ratio and the machine's load are
printed beside it. ``--threads`` sets torch's CPU threads for both sides. Both sides prefill the prompts and
sample every token; ours decodes through the native engine's decode plan (``posttrain.rollout.native_decode.DecodePlan``).
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
from transformers import GraniteMoeHybridForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit, machine

from posttrain.rollout import SamplingParams
from posttrain.rollout.native import NativeEngine
from posttrain.synthetic import arithmetic_corpus, tiny_model

BATCH, PROMPT, NEW = 16, 64, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds of both sides")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tokenizer, model = tiny_model(steps=60)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        theirs = GraniteMoeHybridForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    theirs.generation_config.eos_token_id = None
    texts = arithmetic_corpus(200, seed=123)
    stream = [t for text in texts for t in tokenizer(text)["input_ids"]]
    prompts = [stream[i * PROMPT:(i + 1) * PROMPT] for i in range(BATCH)]
    engine = NativeEngine(model)
    params = SamplingParams(max_new_tokens=NEW, temperature=0, ignore_eos=True)

    def ours() -> list[list[int]]:
        return [c.token_ids for c in engine.generate(prompts, params)]

    def anchor() -> list[list[int]]:
        with torch.inference_mode():
            out = theirs.generate(torch.tensor(prompts), max_new_tokens=NEW, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
        return out[:, PROMPT:].tolist()

    assert ours() == anchor(), "greedy outputs differ between the native engine and transformers"
    times: dict[str, list[float]] = {"ours": [], "anchor": []}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):  # interleaved rounds
        for name, fn in (("ours", ours), ("anchor", anchor)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    tokens = BATCH * NEW
    ratios = [a / o for o, a in zip(times["ours"], times["anchor"])]
    emit("decode_throughput_b16_p64_n128", tokens / min(times["ours"]), tokens / min(times["anchor"]), "tokens/s",
         higher_is_better=True, anchor_is="transformers generate (torch path)",
         median_round_ratio=round(statistics.median(ratios), 3), rounds=args.repeats,
         ours_s=[round(t, 3) for t in times["ours"]], anchor_s=[round(t, 3) for t in times["anchor"]],
         load_1min=[round(load_before, 2), round(os.getloadavg()[0], 2)], machine=machine())


if __name__ == "__main__":
    main()
