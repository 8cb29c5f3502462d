"""``posttrain demo``: the pipeline end to end on a tiny model, on a CPU, with no network.

Stages, each writing into its own folder under ``--out`` so a person can open what it made, and each rerunnable
alone with ``--stage``:

  data      synthetic corpus (GSM8K-format arithmetic) and the byte-level BPE tokenizer with the chat template
  pretrain  the ``tiny`` hybrid trained briefly on the corpus, saved as a Hugging Face checkpoint
  generate  greedy answers from the native engine on held-out questions, with their accuracy

This module wires stages together; the work itself lives in the components it calls.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

STAGES = ["data", "pretrain", "generate"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="folder for every stage's output (default: demo_out)")
    parser.add_argument("--stage", choices=STAGES, action="append",
                        help="run only this stage (repeatable); earlier stages' outputs must exist")
    parser.add_argument("--quick", action="store_true", help="fewer steps (what CI runs)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = args.stage or STAGES
    for stage in STAGES:
        if stage not in stages:
            continue
        start = time.perf_counter()
        print(f"== {stage} ==", flush=True)
        summary = globals()[f"stage_{stage}"](out, args)
        print(f"   {stage} done in {time.perf_counter() - start:.1f}s: {json.dumps(summary)}", flush=True)
    return 0


def _held_out(n: int, seed: int) -> list[dict[str, str]]:
    from posttrain.synthetic import arithmetic_problem

    rng = random.Random(10_000 + seed)  # a different stream from the training corpus
    return [arithmetic_problem(rng) for _ in range(n)]


def stage_data(out: Path, args: argparse.Namespace) -> dict:
    from posttrain.synthetic import arithmetic_corpus
    from posttrain.tokenizer import build_tokenizer

    folder = out / "data"
    folder.mkdir(exist_ok=True)
    corpus = arithmetic_corpus(2000 if args.quick else 8000, seed=args.seed)
    held_out = {p["question"] for p in _held_out(200, args.seed)}
    corpus = [t for t in corpus if t.split("\n")[0].removeprefix("Question: ") not in held_out]
    (folder / "corpus.txt").write_text("\n\n".join(corpus) + "\n")
    tokenizer = build_tokenizer(corpus, vocab_size=512)
    tokenizer.save_pretrained(folder / "tokenizer")
    return {"documents": len(corpus), "vocab": len(tokenizer), "folder": str(folder)}


def stage_pretrain(out: Path, args: argparse.Namespace) -> dict:
    import torch

    from posttrain.models.hybrid import HybridForCausalLM, preset
    from posttrain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(out / "data" / "tokenizer")
    corpus = (out / "data" / "corpus.txt").read_text().split("\n\n")
    torch.manual_seed(args.seed)
    config = preset("tiny", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = HybridForCausalLM(config)
    eos = tokenizer.eos_token_id
    stream = [t for text in corpus for t in tokenizer(text.strip())["input_ids"] + [eos]]
    seq = 128
    data = torch.tensor(stream[: len(stream) // seq * seq]).view(-1, seq)
    steps = 60 if args.quick else 300
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    losses = []
    for _ in range(steps):
        rows = data[torch.randint(0, data.shape[0], (16,), generator=gen)]
        loss = model(rows, labels=rows, return_logits=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss))
    folder = out / "pretrain"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"steps": steps, "loss_first": round(losses[0], 3), "loss_last": round(sum(losses[-10:]) / 10, 3),
            "parameters": model.num_parameters(), "folder": str(folder)}


def stage_generate(out: Path, args: argparse.Namespace) -> dict:
    from posttrain.engine import NativeEngine, SamplingParams
    from posttrain.models.hybrid import HybridForCausalLM
    from posttrain.tokenizer import load_tokenizer

    folder = out / "pretrain"
    tokenizer = load_tokenizer(folder)
    model = HybridForCausalLM.from_pretrained(folder)
    problems = _held_out(50 if args.quick else 200, args.seed)
    prompts = [tokenizer(f"Question: {p['question']}\nAnswer:")["input_ids"] for p in problems]
    params = SamplingParams(max_new_tokens=40, temperature=0, eos_token_id=tokenizer.eos_token_id)
    completions = NativeEngine(model).generate(prompts, params)
    rows, correct = [], 0
    for p, c in zip(problems, completions):
        text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
        gold = p["answer"].rsplit("####", 1)[1].strip()
        got = text.rsplit("####", 1)[1].strip() if "####" in text else None
        correct += got == gold
        rows.append({"question": p["question"], "completion": text, "gold": gold, "correct": got == gold})
    (out / "generate.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for r in rows[:3]:
        print(f"   Q: {r['question']}\n   A:{r['completion']!r}")
    return {"held_out": len(rows), "accuracy": round(correct / len(rows), 3), "file": str(out / "generate.jsonl")}
