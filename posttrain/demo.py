"""``posttrain demo``: the whole pipeline on a tiny model, on a CPU, with no network.

Stages, each writing into its own folder under ``--out`` so a person can open what it made, each rerunnable
alone with ``--stage`` (earlier stages' outputs must exist):

  data      tokenizer and pre-training corpus; SFT candidates with injected bad samples (wrong answers, malformed
            chats, duplicates); GRPO prompts; held-out items disjoint from every training item
  pretrain  the ``tiny`` hybrid pre-trained on the corpus (``posttrain pretrain``)
  filter    rules, answer verification and dedup (``posttrain filter``); the LLM judge runs when ``--judge-url``
            names an OpenAI-compatible endpoint, and is skipped with a line saying so otherwise
  sft       supervised fine-tuning on the kept samples (``posttrain sft``)
  grpo      GRPO with the DAPO loss and the math verifier (``posttrain grpo``)
  export    signed instruct checkpoint (``posttrain export``), then ``posttrain verify``
  eval      held-out accuracy of base / SFT / GRPO with 95% intervals and one-sided paired tests; a picture of
            the GRPO reward and accuracy curves

The task is addition of a two-digit and a one-digit number, answered in chat. This module wires stages together
and writes recipes; the work itself is done by the commands it calls.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import yaml

STAGES = ["data", "pretrain", "filter", "sft", "grpo", "export", "eval"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="folder for every stage's output (default: demo_out)")
    parser.add_argument("--stage", choices=STAGES, action="append",
                        help="run only this stage (repeatable); earlier stages' outputs must exist")
    parser.add_argument("--quick", action="store_true", help="fewer steps, same stages (what CI runs)")
    parser.add_argument("--judge-url", help="OpenAI-compatible endpoint for the LLM-judge filter stage")
    parser.add_argument("--judge-model", default="judge", help="model name at --judge-url")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages = args.stage or STAGES
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    for stage in STAGES:
        if stage not in stages:
            continue
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        print(f"\n== {stage} ==", flush=True)
        summary = globals()[f"stage_{stage}"](out, args)
        summary["time"] = {"wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(_cpu_seconds() - cpu_start, 1)}
        (out / f"{stage}.summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"== {stage} done in {summary['time']['wall_s']:.0f}s ({summary['time']['cpu_s']:.0f} CPU-s): "
              f"{json.dumps(summary)}", flush=True)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s ({_cpu_seconds() - cpu_started:.0f} CPU-s); "
          f"everything is in {out}")
    return 0


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the busy machine's wall time is not)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _cli(*argv: str) -> None:
    from posttrain.cli import main

    code = main([str(a) for a in argv])
    if code:
        raise SystemExit(f"posttrain demo: `posttrain {' '.join(map(str, argv))}` failed with exit code {code}")


def _write_recipe(out: Path, name: str, recipe: dict) -> Path:
    folder = out / "recipes"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------------------
HELD_OUT_PAIRS = 250  # held-out items per task; the other 560 pairs are for training
SFT_PAIRS = 450  # additions SFT sees (GRPO sees these and the other 110)
SFT_TOOL_DEMOS = 30  # tool-call demonstrations among the SFT candidates: the format, not mastery. With 100 of them
# SFT answered 0.4% of held-out additions, with 30 3.2%, with none 36%, at a similar number of epochs of additions
# (16 to 29): the tool-call rows interfere with learning to add, for a reason not yet found.
SFT_STEPS = 150
GRPO_TOOL_PROMPTS = 190  # tool-call prompts among GRPO's (a quarter)
TOKENIZER_VOCAB = 512
TOOL_MAX_NEW_TOKENS = 32  # a call is 24 tokens with the demo's tokenizer; an addition's answer 3
GRPO_STEPS = 200
GRPO_PROMPTS_PER_STEP = 16
GRPO_LR = 3.0e-4

# The tool-call task: the same additions, asked with a calculator tool in the system turn (the chat template renders
# it); the answer is a call with the operands copied over, graded by the ``tool_call`` reward (BFCL's checker)
# against ground truth. One small schema keeps the prompt at 90 tokens (an addition's is 13): GRPO trains on every
# prompt token, and the demo has 15 minutes.
TOOLS = [{"type": "function", "function": {
    "name": "add", "parameters": {"type": "dict", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
TOOL_OPS = {"+": "add"}


def _split_pairs(seed: int):
    pairs = [(a, b) for a in range(10, 100) for b in range(1, 10)]
    random.Random(seed).shuffle(pairs)
    return pairs[:HELD_OUT_PAIRS], pairs[HELD_OUT_PAIRS:]  # held out, train


def _chat(a: int, b: int, answer: str | None) -> list[dict]:
    turns = [{"role": "user", "content": f"{a}+{b}="}]
    if answer is not None:
        turns.append({"role": "assistant", "content": answer})
    return turns


def _tool_question(op: str, a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"{a}{op}{b} by tool"}]


def _tool_call_text(name: str, a: int, b: int) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': {'a': a, 'b': b}})}</tool_call>"


def _tool_row(op: str, a: int, b: int) -> dict:
    """A tool-call item: the question, the tools, and BFCL-style ground truth ``[{name: {param: [allowed]}}]``."""
    return {"prompt": _tool_question(op, a, b), "tools": TOOLS, "ground_truth": [{TOOL_OPS[op]: {"a": [a], "b": [b]}}],
            "answer": None, "task": "tool_call"}


def _math_row(a: int, b: int) -> dict:
    return {"prompt": _chat(a, b, None), "answer": str(a + b), "tools": None, "ground_truth": None, "task": "math"}


def _as_rendered(row: dict, tokenizer) -> dict:
    """GRPO's prompt column: chat turns as they are, or, with tools, the text the chat template renders with them
    (``posttrain grpo`` applies the template to chat prompts without a ``tools`` argument)."""
    if not row["tools"]:
        return row
    text = tokenizer.apply_chat_template(row["prompt"], tools=row["tools"], add_generation_prompt=True, tokenize=False)
    return dict(row, prompt=text)


def stage_data(out: Path, args: argparse.Namespace) -> dict:
    from posttrain.tokenizer import build_tokenizer

    rng = random.Random(args.seed)
    folder = out / "data"
    folder.mkdir(exist_ok=True)
    held_out, train = _split_pairs(args.seed)
    # pre-training corpus: counting and number words, never a sum of a held-out pair
    corpus = []
    for _ in range(3000):
        start = rng.randint(0, 95)
        corpus.append({"text": " ".join(str(start + i) for i in range(rng.randint(3, 8)))})
    for a, b in train[:300]:
        corpus.append({"text": f"{a} plus {b} is {a + b}."})
    rng.shuffle(corpus)
    _jsonl(folder / "pretrain.jsonl", corpus)
    tool_train = [("+", a, b) for a, b in train]
    # the tokenizer also learns from rendered tool prompts and calls, so that their fixed parts become few tokens
    # (a first, throw-away build only renders the chat template)
    texts = [r["text"] for r in corpus] + [f"{a}+{b}={a + b}" for a, b in train]
    texts += [_tool_call_text(TOOL_OPS[op], a, b) for op, a, b in tool_train[:200]]
    tool_prompt = build_tokenizer(texts[:10], vocab_size=300).apply_chat_template(
        _tool_question("+", 10, 1), tools=TOOLS, add_generation_prompt=True, tokenize=False)
    tokenizer = build_tokenizer(texts + [tool_prompt] * 50, vocab_size=TOKENIZER_VOCAB)
    tokenizer.save_pretrained(folder / "tokenizer")
    # SFT candidates: every SFT pair once, correct; a few tool-call demonstrations; then the injected bad ones
    sft_pairs = train[:SFT_PAIRS]
    rows = [{"messages": _chat(a, b, str(a + b)), "answer": str(a + b), "ground_truth": None, "demo_kind": "clean"}
            for a, b in sft_pairs]
    sft_tools = tool_train[:SFT_TOOL_DEMOS]
    for op, a, b in sft_tools:
        row = _tool_row(op, a, b)
        rows.append({"messages": row["prompt"] + [{"role": "assistant", "content": _tool_call_text(TOOL_OPS[op], a, b)}],
                     "tools": TOOLS, "answer": None, "ground_truth": row["ground_truth"], "demo_kind": "clean"})
    bad = []
    for a, b in rng.sample(sft_pairs, 90):  # wrong answers, as unfiltered data has
        bad.append({"messages": _chat(a, b, str(a + b + rng.choice([-1, 1, 10]))), "answer": str(a + b),
                    "ground_truth": None, "demo_kind": "wrong_answer"})
    for op, a, b in rng.sample(sft_tools, min(15, len(sft_tools))):  # calls with a wrong argument
        wrong = (TOOL_OPS[op], b, a) if rng.random() < 0.5 else (TOOL_OPS[op], a, b + 1)
        bad.append({"messages": _tool_question(op, a, b) + [{"role": "assistant", "content": _tool_call_text(*wrong)}],
                    "tools": TOOLS, "answer": None, "ground_truth": [{TOOL_OPS[op]: {"a": [a], "b": [b]}}],
                    "demo_kind": "wrong_call"})
    for i, (a, b) in enumerate(rng.sample(sft_pairs, 30)):  # malformed chats
        broken = [_chat(a, b, "")[0] | {"role": "user"}, {"role": "assistant", "content": ""}] if i % 3 == 0 else (
            [{"role": "assistant", "content": str(a + b)}, {"role": "user", "content": f"{a}+{b}="}] if i % 3 == 1
            else [{"role": "assistant", "content": str(a + b)}])
        bad.append({"messages": broken, "answer": str(a + b), "ground_truth": None, "demo_kind": "malformed"})
    for row in rng.sample(rows, 60):  # exact copies
        bad.append(dict(row, demo_kind="duplicate"))
    candidates = rows + bad
    rng.shuffle(candidates)
    seen = set()
    for row in candidates:  # of two identical rows, the later one in the file is the duplicate
        key = json.dumps(row["messages"], sort_keys=True)
        if row["demo_kind"] in ("clean", "duplicate"):
            row["demo_kind"] = "duplicate" if key in seen else "clean"
        seen.add(key)
    _jsonl(folder / "sft_candidates.jsonl", candidates)
    # GRPO prompts: math on every training pair (the ones SFT did not see first), tool calls on training pairs;
    # held-out items of both tasks on the held-out pairs, disjoint from every training item
    grpo_rows = [_math_row(a, b) for a, b in train[SFT_PAIRS:] + train[:SFT_PAIRS]]
    grpo_rows += [_tool_row(op, a, b) for op, a, b in tool_train[:GRPO_TOOL_PROMPTS]]
    rng.shuffle(grpo_rows)
    _jsonl(folder / "grpo_prompts.jsonl", [_as_rendered(r, tokenizer) for r in grpo_rows])
    held_rows = [_math_row(a, b) for a, b in held_out] + [_tool_row("+", a, b) for a, b in held_out]
    _jsonl(folder / "held_out.jsonl", held_rows)
    _jsonl(folder / "held_out_grpo.jsonl", [_as_rendered(r, tokenizer) for r in held_rows if r["task"] == "math"])
    train_set = set(train)
    assert not train_set & set(held_out)
    lengths = [len(tokenizer.apply_chat_template(r["prompt"], tools=r["tools"], add_generation_prompt=True,
                                                 return_dict=True)["input_ids"]) for r in held_rows]
    return {"tokenizer_vocab": len(tokenizer), "pretrain_docs": len(corpus), "sft_candidates": len(candidates),
            "sft_tool_demos": len(sft_tools), "injected_bad": len(bad), "grpo_prompts": len(grpo_rows),
            "grpo_tool_prompts": sum(r["task"] == "tool_call" for r in grpo_rows),
            "held_out": {"math": len(held_out), "tool_call": len(held_out)}, "longest_prompt_tokens": max(lengths)}


def stage_pretrain(out: Path, args: argparse.Namespace) -> dict:
    recipe = {
        "model": {"preset": "tiny", "tokenizer": str(out / "data" / "tokenizer")},
        "data": {"train_files": [str(out / "data" / "pretrain.jsonl")], "format": "text", "max_length": 128,
                 "packing": True},
        "optim": {"lr": 3.0e-3, "weight_decay": 0.01, "per_device_batch_size": 8, "max_steps": 25 if args.quick else 150,
                  "schedule": "wsd", "warmup_steps": 10, "decay_fraction": 0.2},
        "checkpoint": {"output_dir": str(out / "pretrain"), "every_steps": 0, "resume": False},
        "logging": {"progress": False},
        "seed": args.seed,
    }
    _cli("pretrain", "--config", _write_recipe(out, "pretrain", recipe))
    return {"checkpoint": str(out / "pretrain" / "final")}


def stage_filter(out: Path, args: argparse.Namespace) -> dict:
    config: dict = {
        "rules": [
            {"name": "chat_structure"},
            {"name": "verify_answer", "id": "verify_math", "reward": "math",
             "reward_options": {"answer_column": "answer"}, "min_score": 1.0, "keep_unverifiable": True},
            {"name": "verify_answer", "id": "verify_tool_call", "reward": "tool_call", "min_score": 1.0,
             "keep_unverifiable": True},
        ],
        "dedup": {"exact": True, "near": {"ngram": 3, "threshold": 0.8}},
    }
    if args.judge_url:
        config["judge"] = {"mode": "pointwise", "backend": {"type": "openai", "base_url": args.judge_url,
                                                            "model": args.judge_model}}
    else:
        print("   LLM judge: skipped (no --judge-url given); rules, answer verification and dedup only")
    recipe = _write_recipe(out, "filter", config)
    _cli("filter", "--config", recipe, "--input", out / "data" / "sft_candidates.jsonl", "--output", out / "filter",
         "--no-progress")
    kept = _read_jsonl(out / "filter" / "kept.jsonl")
    rejected = _read_jsonl(out / "filter" / "rejected.jsonl")
    bad_total = sum(r["demo_kind"] != "clean" for r in kept + rejected)
    clean_total = len(kept) + len(rejected) - bad_total
    bad_removed = sum(r["demo_kind"] != "clean" for r in rejected)
    clean_lost = sum(r["demo_kind"] == "clean" for r in rejected)
    summary = {"kept": len(kept), "rejected": len(rejected), "injected_bad_removed": f"{bad_removed}/{bad_total}",
               "injected_bad_removed_pct": round(100 * bad_removed / max(bad_total, 1), 1),
               "clean_lost": f"{clean_lost}/{clean_total}",
               "clean_lost_pct": round(100 * clean_lost / max(clean_total, 1), 2)}
    print(f"   filter removed {bad_removed} of {bad_total} injected bad samples ({summary['injected_bad_removed_pct']}%, "
          f"target >= 95%) and lost {clean_lost} of {clean_total} clean ones ({summary['clean_lost_pct']}%, target <= 1%)")
    if not args.judge_url and (bad_removed < 0.95 * bad_total or clean_lost > 0.01 * clean_total):
        # (a judge may also reject samples that are correct, by its own rubric: then the targets are only printed)
        raise SystemExit(f"posttrain demo: the filter missed its targets: {json.dumps(summary)}")
    return summary


def stage_sft(out: Path, args: argparse.Namespace) -> dict:
    recipe = {
        "model": {"path": str(out / "pretrain" / "final")},
        "data": {"train_files": [str(out / "filter" / "kept.jsonl")], "format": "messages", "max_length": 256,
                 "packing": True},
        "optim": {"lr": 2.0e-3, "per_device_batch_size": 8, "max_steps": 20 if args.quick else SFT_STEPS,
                  "schedule": "cosine", "warmup_steps": 5, "min_lr_ratio": 0.1},
        "checkpoint": {"output_dir": str(out / "sft"), "every_steps": 0, "resume": False},
        "logging": {"progress": False},
        "seed": args.seed,
    }
    _cli("sft", "--config", _write_recipe(out, "sft", recipe))
    return {"checkpoint": str(out / "sft" / "final")}


def stage_grpo(out: Path, args: argparse.Namespace) -> dict:
    # Dynamic sampling is off: posttrain grpo judges a group uniform by one outcome reward (the first, math), which
    # is None on every tool-call prompt, so it would drop every tool-call group. Uniform groups get advantage 0.
    recipe = {
        "model": {"path": str(out / "sft" / "final")},
        "data": {"path": str(out / "data" / "grpo_prompts.jsonl"), "prompt_column": "prompt",
                 "max_prompt_tokens": 256},
        "rollout": {"prompts_per_step": GRPO_PROMPTS_PER_STEP, "num_generations": 8,
                    "max_new_tokens": TOOL_MAX_NEW_TOKENS, "temperature": 1.0},
        "dynamic_sampling": {"enabled": False},
        "loss": {"type": "dapo"},
        "rewards": {"rewards": [{"name": "math", "weight": 1.0}, {"name": "tool_call", "weight": 1.0}],
                    "num_workers": 0},
        "optim": {"lr": GRPO_LR, "mini_batches": 2, "micro_batch_tokens": 4096},
        "eval": {"path": str(out / "data" / "held_out_grpo.jsonl"), "every": 50, "max_prompts": 64, "num_samples": 1,
                 "temperature": 0.0},
        "run": {"output_dir": str(out / "grpo"), "steps": 4 if args.quick else GRPO_STEPS, "seed": args.seed},
        "logging": {"progress": False},
    }
    _cli("grpo", "--config", _write_recipe(out, "grpo", recipe))
    return {"checkpoint": str(out / "grpo" / "final")}


def stage_export(out: Path, args: argparse.Namespace) -> dict:
    key = out / "signing_key.pem"
    extra = [] if key.exists() else ["--generate-key"]
    _cli("export", "--model", out / "grpo" / "final", "--out", out / "export", "--key", key,
         "--recipe", out / "recipes" / "grpo.yaml", *extra)
    _cli("verify", out / "export")
    return {"checkpoint": str(out / "export"), "signed_with": str(key)}


# ------------------------------------------------------------------------------------------------------------
def _hits(folder: Path, items: list[dict]) -> list[bool]:
    """Greedy answers of the checkpoint in ``folder`` to every held-out item, graded by its task's reward."""
    from posttrain.engine import NativeEngine, SamplingParams
    from posttrain.models.hybrid import HybridForCausalLM
    from posttrain.rewards import get
    from posttrain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(folder)
    engine = NativeEngine(HybridForCausalLM.from_pretrained(folder))
    hits: list[bool] = [False] * len(items)
    for task, reward, max_new in (("math", get("math"), 6), ("tool_call", get("tool_call"), TOOL_MAX_NEW_TOKENS)):
        index = [i for i, r in enumerate(items) if r["task"] == task]
        prompts = [tokenizer.apply_chat_template(items[i]["prompt"], tools=items[i]["tools"], add_generation_prompt=True,
                                                 return_dict=True)["input_ids"] for i in index]
        params = SamplingParams(max_new_tokens=max_new, temperature=0, eos_token_id=tokenizer.eos_token_id)
        texts = [tokenizer.decode(c.token_ids, skip_special_tokens=False).removesuffix(tokenizer.eos_token)
                 for c in engine.generate(prompts, params)]
        columns = {k: [items[i][k] for i in index] for k in ("answer", "ground_truth", "tools")}
        for i, score in zip(index, reward([items[i]["prompt"] for i in index], texts, **columns), strict=True):
            hits[i] = score == 1.0
    return hits


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_one_sided_p(better: list[bool], worse: list[bool]) -> float:
    """Exact one-sided McNemar (sign) test on the discordant items: P(at least this many wins | no difference)."""
    wins = sum(b and not w for b, w in zip(better, worse))
    losses = sum(w and not b for b, w in zip(better, worse))
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def stage_eval(out: Path, args: argparse.Namespace) -> dict:
    from rich.console import Console
    from rich.table import Table

    items = _read_jsonl(out / "data" / "held_out.jsonl")
    stages = {"base": out / "pretrain" / "final", "sft": out / "sft" / "final", "grpo": out / "export"}
    correct = {name: _hits(folder, items) for name, folder in stages.items()}
    tasks = {"math": [i for i, r in enumerate(items) if r["task"] == "math"],
             "tool_call": [i for i, r in enumerate(items) if r["task"] == "tool_call"],
             "all": list(range(len(items)))}
    table = Table(title="held-out accuracy (greedy) on items disjoint from every training item")
    for column in ("task", "items", "model", "accuracy", "95% interval", "one-sided p vs previous"):
        table.add_column(column)
    summary: dict = {"held_out": {task: len(index) for task, index in tasks.items()}}
    for task, index in tasks.items():
        summary[task] = {}
        previous = None
        for name, hits in correct.items():
            mine = [hits[i] for i in index]
            k = sum(mine)
            lo, hi = _wilson(k, len(mine))
            p = paired_one_sided_p(mine, [correct[previous][i] for i in index]) if previous else None
            table.add_row(task if previous is None else "", str(len(mine)) if previous is None else "", name,
                          f"{k / len(mine):.3f}", f"[{lo:.3f}, {hi:.3f}]", "" if p is None else f"{p:.2g}")
            summary[task][name] = {"accuracy": round(k / len(mine), 4), "ci95": [round(lo, 4), round(hi, 4)],
                                   "p_vs_previous": p}
            previous = name
        table.add_section()
    Console().print(table)
    verdict = {f"{task}: {later} > {earlier}": summary[task][later]["p_vs_previous"] < 0.05
               for task in tasks for earlier, later in (("base", "sft"), ("sft", "grpo"))}
    summary["significant_at_0.05"] = verdict
    for claim, ok in verdict.items():
        print(f"   {claim}: {'significant' if ok else 'NOT significant'} at p < 0.05 (one-sided paired sign test)")
    summary["curves"] = _plot_curves(out)
    return summary


def _plot_curves(out: Path) -> str | None:
    metrics = out / "grpo" / "metrics.jsonl"
    if not metrics.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_jsonl(metrics)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("reward/mean", "train reward"), ("accuracy", "train accuracy"),
                       ("eval/accuracy", "held-out accuracy")):
        points = [(r.get("step", i), r[key]) for i, r in enumerate(rows) if isinstance(r.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xlabel("GRPO step")
    ax.legend()
    fig.tight_layout()
    path = out / "grpo_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
