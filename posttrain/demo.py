"""``posttrain demo``: the whole pipeline on a tiny model, on a CPU, with no network.

Stages, each writing into its own folder under ``--out`` so a person can open what it made, each rerunnable
alone with ``--stage`` (earlier stages' outputs must exist):

  data      tokenizer and pre-training corpus; SFT candidates with injected bad samples (wrong answers and wrong
            calls, malformed chats, duplicates); GRPO and DPO prompts; held-out items disjoint from every training item
  pretrain  the ``tiny`` hybrid pre-trained on the corpus (``posttrain pretrain``)
  filter    rules, answer and call verification, dedup (``posttrain filter``); the LLM judge runs when ``--judge-url``
            names an OpenAI-compatible endpoint, and is skipped with a line saying so otherwise
  sft       supervised fine-tuning on the kept samples (``posttrain sft``)
  dpo       on-policy preference pairs on the training items of both tasks: the SFT model's greedy answer where
            the task's reward refutes it, against a verified sample or the item's right answer as SFT writes it
            (``posttrain pairs --pairing on_policy``), then DPO from the SFT checkpoint (``posttrain dpo``); SFT's
            and DPO's accuracy on a validation slice of training items, on which DPO's settings were chosen
  grpo      GRPO with the DAPO loss from the SFT checkpoint, on both tasks: the math verifier for additions, the
            tool-call reward for calls (``posttrain grpo``)
  export    signed instruct checkpoint of the GRPO model (``posttrain export``), then ``posttrain verify``
  eval      held-out accuracy of base / SFT / DPO / GRPO per task with 95% intervals and one-sided paired tests
            (SFT against base, DPO and GRPO against SFT; statistics from ``posttrain.eval.metrics``); a picture
            of the GRPO reward and accuracy curves

Two tasks, both in chat: ``add``, a two-digit plus a one-digit number answered with the sum (``47+8=`` -> ``55``),
and ``tool``, a product the model must hand to the ``multiply`` tool that the prompt declares (``47*6=`` -> a
``<tool_call>`` with ``{"a": 47, "b": 6}``). This module wires stages together and writes recipes; the work itself
is done by the commands it calls.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import yaml

STAGES = ["data", "pretrain", "filter", "sft", "dpo", "grpo", "export", "eval"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="folder for every stage's output (default: demo_out)")
    parser.add_argument("--stage", choices=STAGES, action="append",
                        help="run only this stage (repeatable); earlier stages' outputs must exist")
    parser.add_argument("--quick", action="store_true", help="fewer steps, same stages (what CI runs)")
    parser.add_argument("--judge-url", help="OpenAI-compatible endpoint for the LLM-judge filter stage")
    parser.add_argument("--judge-model", default="judge", help="model name at --judge-url")
    parser.add_argument("--dpo-setting", action="append", metavar="KEY=VALUE",
                        help="override one of the DPO stage's settings (beta, nll_weight, lr, steps), to choose them "
                             "on its validation slice (repeatable)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's CPU threads for every stage (default 1, what the README's tables were taken "
                             "with: float sums are ordered by the thread count, so another count gives other numbers; "
                             "one thread gives the same numbers on any machine and is slowed least by a busy one)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds every stage: the data (operand split, corpus, injected samples), the model's "
                             "initialisation, data order, sampled pairs and rollouts, the sampled evaluation")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads < 1:
        raise SystemExit(f"posttrain demo: --threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    for stage in [s for s in STAGES if s in (args.stage or STAGES)]:
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        print(f"\n== {stage} ==", flush=True)
        summary = globals()[f"stage_{stage}"](out, args)
        summary["seed"], summary["threads"] = args.seed, args.threads
        summary["time"] = {"wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(_cpu_seconds() - cpu_start, 1)}
        (out / f"{stage}.summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"== {stage} done in {summary['time']['wall_s']:.0f}s ({summary['time']['cpu_s']:.0f} CPU-s): "
              f"{json.dumps(summary)}", flush=True)
    print(f"\ndemo (seed {args.seed}) finished in {time.perf_counter() - started:.0f}s "
          f"({_cpu_seconds() - cpu_started:.0f} CPU-s); everything is in {out}")
    return 0


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (a busy machine's wall time is not)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _cli(*argv: str) -> None:
    from posttrain.cli import main

    code = main([str(a) for a in argv])
    if code:
        raise SystemExit(f"posttrain demo: `posttrain {' '.join(map(str, argv))}` failed with exit code {code}")


def _write_recipe(out: Path, name: str, recipe: dict, header: str = "") -> Path:
    folder = out / "recipes"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(header + yaml.safe_dump(recipe, sort_keys=False))
    return path


def _train(out: Path, command: str, recipe: dict, seed: int, header: str = "") -> dict:
    """Run a pretrain, SFT or DPO recipe with its last groups added: checkpoints in ``out/command`` (the final one
    only, no resuming), no progress bars, the demo's seed."""
    recipe |= {"checkpoint": {"output_dir": str(out / command), "every_steps": 0},
               "logging": {"progress": False}, "run": {"seed": seed, "resume": None}}
    _cli(command, "--config", _write_recipe(out, command, recipe, header))
    return {"checkpoint": str(out / command / "final")}


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------------------
# The tasks. add: "a+b=" answered with the sum (the math verifier checks it). tool: "a*b=" answered by calling the
# ``multiply`` tool that the prompt declares (the tool-call reward grades the call against the expected one).
MULTIPLY = {"type": "function", "function": {
    "name": "multiply", "description": "The product of two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
TOOL_SYSTEM = "tool: multiply(a: integer, b: integer)"
TOOL_REWARD_OPTIONS = {"ground_truth_column": "ground_truth", "tools_column": "tool_schema"}
HELD_OUT = {"add": 300, "tool": 250}  # held-out items per task
SFT_ITEMS = {"add": 400, "tool": 240}  # training items with an SFT demonstration (the rest are GRPO-only prompts)


def _split_pairs(seed: int, task: str):
    """(held out, train) operand pairs of ``task``; the two never share a pair."""
    pairs = [(a, b) for a in range(10, 100) for b in range(1 if task == "add" else 2, 10)]
    random.Random(f"{seed}-{task}").shuffle(pairs)
    return pairs[:HELD_OUT[task]], pairs[HELD_OUT[task]:]


def _item(task: str, a: int, b: int) -> dict:
    """A prompt row with every task's columns (a reward skips the rows whose column is None). The tool is declared
    in a one-line system message rather than the chat template's tools block, which is ~100 tokens of JSON schema:
    at this model's size that would make every tool sample 5x longer than an addition; ``tool_schema`` holds the
    schema the tool-call reward checks the arguments' types against."""
    if task == "add":
        return {"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b), "ground_truth": None,
                "tool_schema": None, "task": "add"}
    return {"prompt": [{"role": "system", "content": TOOL_SYSTEM}, {"role": "user", "content": f"{a}*{b}="}],
            "answer": None, "ground_truth": [{"multiply": {"a": [a], "b": [b]}}], "tool_schema": [MULTIPLY],
            "task": "tool"}


def _call(a: int, b: int, name: str = "multiply") -> dict:
    return {"type": "function", "function": {"name": name, "arguments": {"a": a, "b": b}}}


def _demonstration(task: str, a: int, b: int, answer: str | None = None, call: dict | None = None) -> dict:
    """An SFT row: the item's prompt and an assistant turn (by default the right one)."""
    row = _item(task, a, b)
    messages = list(row.pop("prompt"))
    if task == "add":
        messages.append({"role": "assistant", "content": str(a + b) if answer is None else answer})
    else:
        messages.append({"role": "assistant", "content": "", "tool_calls": [call or _call(a, b)]})
    return {"messages": messages, **row, "demo_kind": "clean"}


def stage_data(out: Path, args: argparse.Namespace) -> dict:
    from posttrain.tokenizer import build_tokenizer

    rng = random.Random(args.seed)
    folder = out / "data"
    folder.mkdir(exist_ok=True)
    held_out, train = {}, {}
    for task in ("add", "tool"):
        held_out[task], train[task] = _split_pairs(args.seed, task)
    # pre-training corpus: counting, sums written out, and operands copied into JSON (the skill a tool call needs);
    # only training pairs, never a held-out sum or product, and no chat markup
    corpus = []
    for _ in range(2000):
        start = rng.randint(0, 95)
        corpus.append({"text": " ".join(str(start + i) for i in range(rng.randint(3, 8)))})
    for _ in range(1500):
        sums = rng.sample(train["add"], 4)
        corpus.append({"text": " ".join(f"{a}+{b}={a + b}" for a, b in sums)})
    for _ in range(1500):
        a, b = rng.choice(train["tool"])
        corpus.append({"text": f"{a} times {b}: " + json.dumps({"a": a, "b": b})})
    rng.shuffle(corpus)
    _jsonl(folder / "pretrain.jsonl", corpus)
    calls = [json.dumps({"name": "multiply", "arguments": {"a": a, "b": b}}) for a, b in train["tool"]]
    tokenizer = build_tokenizer([r["text"] for r in corpus] + [f"{a}+{b}={a + b}" for a, b in train["add"]]
                                + calls + [f"system {TOOL_SYSTEM} user assistant"] * 50, vocab_size=512)
    tokenizer.save_pretrained(folder / "tokenizer")
    # SFT candidates: a demonstration of each SFT item, correct; then the injected bad ones
    sft_items = [(task, a, b) for task in ("add", "tool") for a, b in train[task][:SFT_ITEMS[task]]]
    rows = [_demonstration(*item) for item in sft_items]
    bad = []
    for task, a, b in rng.sample(sft_items, 90):  # wrong answers and wrong calls, as unfiltered data has
        if task == "add":
            row = _demonstration(task, a, b, answer=str(a + b + rng.choice([-1, 1, 10])))
        else:
            row = _demonstration(task, a, b, call=_call(a + rng.choice([-1, 1]), b) if rng.random() < 0.7
                                 else _call(a, b, name="add"))  # wrong operands, or a tool nobody declared
        bad.append(row | {"demo_kind": "wrong_answer"})
    for i, (task, a, b) in enumerate(rng.sample(sft_items, 30)):  # malformed chats
        good = _demonstration(task, a, b)
        *head, assistant = good["messages"]
        broken = ([*head, {"role": "assistant", "content": ""}] if i % 3 == 0 else
                  [assistant, *head] if i % 3 == 1 else [assistant])
        bad.append(good | {"messages": broken, "demo_kind": "malformed"})
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
    # GRPO prompts: every training item of both tasks (SFT's and the ones SFT never saw)
    grpo = [_item(task, a, b) for task in ("add", "tool") for a, b in train[task]]
    rng.shuffle(grpo)
    _jsonl(folder / "grpo_prompts.jsonl", grpo)
    held = [_item(task, a, b) for task in ("add", "tool") for a, b in held_out[task]]
    rng.shuffle(held)  # GRPO's periodic evaluation reads the first 64: both tasks
    _jsonl(folder / "held_out.jsonl", held)
    return {"tokenizer_vocab": len(tokenizer), "pretrain_docs": len(corpus), "sft_candidates": len(candidates),
            "injected_bad": len(bad), "grpo_prompts": len(grpo), "held_out": {t: len(v) for t, v in held_out.items()}}


def stage_pretrain(out: Path, args: argparse.Namespace) -> dict:
    recipe = {
        "model": {"preset": "tiny", "tokenizer": str(out / "data" / "tokenizer")},
        "data": {"train_files": [str(out / "data" / "pretrain.jsonl")], "format": "text", "max_length": 128,
                 "packing": True},
        "optim": {"lr": 3.0e-3, "weight_decay": 0.01, "per_device_batch_size": 8, "max_steps": 40 if args.quick else 150,
                  "schedule": "wsd", "warmup_steps": 10, "decay_fraction": 0.2},
    }
    return _train(out, "pretrain", recipe, args.seed)


def stage_filter(out: Path, args: argparse.Namespace) -> dict:
    config: dict = {
        "rules": [
            {"name": "chat_structure", "tools_column": "tool_schema"},
            # additions: the sum checked by the math verifier; tool calls: the call graded against the expected one
            # (each reward gives None on the other task's rows, which this rule then keeps)
            {"name": "verify_answer", "id": "verify_sum", "reward": "math", "reward_options": {"answer_column": "answer"},
             "min_score": 1.0, "keep_unverifiable": True},
            {"name": "verify_answer", "id": "verify_call", "reward": "tool_call", "reward_options": TOOL_REWARD_OPTIONS,
             "min_score": 1.0, "keep_unverifiable": True},
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
        # (a judge may also reject correct samples by its own rubric: with one, the targets are only printed)
        raise SystemExit(f"posttrain demo: the filter missed its targets: {json.dumps(summary)}")
    return summary


def stage_sft(out: Path, args: argparse.Namespace) -> dict:
    recipe = {
        "model": {"path": str(out / "pretrain" / "final")},
        "data": {"train_files": [str(out / "filter" / "kept.jsonl")], "format": "messages", "max_length": 256,
                 "packing": True},
        "optim": {"lr": 2.0e-3, "per_device_batch_size": 8, "max_steps": 40 if args.quick else 180,
                  "schedule": "cosine", "warmup_steps": 5, "min_lr_ratio": 0.1},
    }
    return _train(out, "sft", recipe, args.seed)


DPO_VALIDATION = {"add": 60, "tool": 60}  # training items never in a pair nor an SFT demonstration: DPO's settings
# are to be chosen on their greedy accuracy (the stage reports it), never on the held-out items
# The DPO settings, chosen on the validation slice (seed 0, greedy, 60 additions + 60 tool calls; SFT: 0.625 of
# 120), never on the held-out items: of nine settings tried (`posttrain demo --stage dpo --dpo-setting beta=0.1
# --dpo-setting nll_weight=1 ...`, reading `validation` in dpo.summary.json), none beat SFT:
#   beta 0.1, nll_weight 0,   lr 1e-5, 20 steps: 0.625 (add 0.833, tool 0.417)  <- chosen: the best, level with SFT
#   beta 0.1, nll_weight 1,   lr 2e-5, 15 steps: 0.617 (0.817, 0.417)
#   beta 0.1, nll_weight 1,   lr 2e-5, 60 steps: 0.567 (0.783, 0.350)
#   beta 1.0, nll_weight 1,   lr 5e-5, 60 steps: 0.558 (0.800, 0.317)
#   beta 0.1, nll_weight 1,   lr 1e-4, 60 steps: 0.517 (0.717, 0.317)
#   beta 0.5, nll_weight 0,   lr 2e-5, 60 steps: 0.492 (0.800, 0.183)
#   beta 0.1, nll_weight 0,   lr 2e-5, 60 steps: 0.467 (0.800, 0.133)
#   beta 0.5, nll_weight 1,   lr 1e-4, 60 steps: 0.458 (0.717, 0.200)
#   beta 0.1, nll_weight 0.2, lr 5e-5, 60 steps: 0.433 (0.750, 0.117)
# The longer or faster the stage trains, the lower the validation accuracy falls, with or without the NLL term.
DPO_SETTINGS = {"beta": 0.1, "nll_weight": 0.0, "lr": 1.0e-5, "steps": 20}


def _dpo_slices(seed: int) -> tuple[dict[str, list[dict]], list[dict]]:
    """(per task, the prompts pairs are built on: every training item of the task but the validation slice; the
    validation slice: items of both tasks from the training pairs that have no SFT demonstration, so they are as new
    to the model as held-out items are, without being any)."""
    rng = random.Random(f"{seed}-dpo-validation")
    validation, pair_prompts = [], {}
    for task in ("add", "tool"):
        train = _split_pairs(seed, task)[1]
        unseen = list(train[SFT_ITEMS[task]:])
        rng.shuffle(unseen)
        held_back = set(unseen[:DPO_VALIDATION[task]])
        validation += [_item(task, a, b) for a, b in sorted(held_back)]
        pair_prompts[task] = [_item(task, a, b) for a, b in train if (a, b) not in held_back]
    return pair_prompts, validation


def _reference_answer(tokenizer, row: dict) -> str:
    """The item's right answer as the SFT targets write it: the assistant turn of its demonstration rendered by the
    chat template (a tool call with its tags), less the end of the turn."""
    a, b = (int(x) for x in row["prompt"][-1]["content"].rstrip("=").replace("*", "+").split("+"))
    messages = _demonstration(row["task"], a, b)["messages"]
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise SystemExit(f"posttrain demo: the chat template does not extend the prompt of {row['prompt']}")
    return full[len(prompt):].rstrip("\n").removesuffix(tokenizer.eos_token)


def _dpo_overrides(given: list[str]) -> dict[str, float | int]:
    """``--dpo-setting KEY=VALUE`` pairs as DPO_SETTINGS values; an unknown key or a bad number is an error naming it."""
    out: dict[str, float | int] = {}
    for item in given:
        key, sep, value = item.partition("=")
        if not sep or key not in DPO_SETTINGS:
            raise SystemExit(f"posttrain demo: --dpo-setting {item!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(DPO_SETTINGS)}")
        try:
            out[key] = int(value) if key == "steps" else float(value)
        except ValueError:
            raise SystemExit(f"posttrain demo: --dpo-setting {item!r}: {value!r} is not a number") from None
    return out


def stage_dpo(out: Path, args: argparse.Namespace) -> dict:
    """The ``dpo`` stage of the module docstring: a chosen answer is one of 4 sampled at temperature 1 that the reward
    verifies, else the item's reference answer; the validation slice is ``_dpo_slices``'s."""
    from posttrain.tokenizer import load_tokenizer

    folder = out / "dpo"
    folder.mkdir(exist_ok=True)
    pair_prompts, validation = _dpo_slices(args.seed)
    tokenizer = load_tokenizer(out / "data" / "tokenizer")  # the one every checkpoint of the demo carries
    _jsonl(folder / "validation.jsonl", validation)
    rewards = {"add": ("math", {"answer_column": "answer"}), "tool": ("tool_call", TOOL_REWARD_OPTIONS)}
    new_tokens = {"add": 6, "tool": 28}
    files, counts, made = [], {}, {}
    for task, rows in pair_prompts.items():
        _jsonl(folder / f"pair_prompts_{task}.jsonl", [{**r, "reference": _reference_answer(tokenizer, r)} for r in rows])
        pairs = folder / f"pairs_{task}.jsonl"
        reward, options = rewards[task]
        _cli("pairs", "--config", _write_recipe(out, f"pairs_{task}", {
            "prompts_file": str(folder / f"pair_prompts_{task}.jsonl"), "prompt_field": "prompt",
            "output": str(pairs), "pairing": "on_policy",
            "sampling": {"model": str(out / "sft" / "final"), "num_samples": 4, "temperature": 1.0,
                         "max_new_tokens": new_tokens[task], "seed": args.seed},
            "verdict": {"source": "reward", "reward": reward, "reward_options": options,
                        "reference_answer": "{reference}"},
        }))
        files.append(str(pairs))
        made[task] = len(_read_jsonl(pairs))
        counts[task] = json.loads((folder / f"pairs_{task}.jsonl.manifest.json").read_text())["on_policy"]
    if not sum(made.values()):
        raise SystemExit(f"posttrain demo: no preference pair: the SFT model's greedy answer is right on every "
                         f"training item in {folder} ({counts})")
    settings = dict(DPO_SETTINGS, steps=10 if args.quick else DPO_SETTINGS["steps"])
    settings.update(_dpo_overrides(getattr(args, "dpo_setting", None) or []))
    recipe = {
        "model": {"path": str(out / "sft" / "final")},
        "data": {"train_files": files, "max_length": 64},
        "loss": {"type": "sigmoid", "beta": settings["beta"], "nll_weight": settings["nll_weight"]},
        "optim": {"lr": settings["lr"], "per_device_batch_size": 8,
                  "max_steps": settings["steps"], "schedule": "cosine", "warmup_steps": 3},
    }
    _train(out, "dpo", recipe, args.seed, header="# beta, nll_weight, lr and steps: DPO_SETTINGS in posttrain/demo.py "
           "(or --dpo-setting), chosen on the greedy\n# accuracy of a validation slice of training items "
           "(dpo/validation.jsonl, reported in dpo.summary.json),\n# never on the held-out items; the settings tried "
           "and what each gave are listed beside DPO_SETTINGS\n")
    accuracy = {name: _accuracy(out / name / "final", validation) for name in ("sft", "dpo")}
    tasks = {task: [i for i, r in enumerate(validation) if r["task"] == task] for task in ("add", "tool")}
    on_validation = {name: {task: round(sum(hits[i] for i in members) / len(members), 4)
                            for task, members in tasks.items()} | {"all": round(sum(hits) / len(hits), 4)}
                     for name, hits in accuracy.items()}
    for task in pair_prompts:
        c = counts[task]
        print(f"   {task}: {made[task]} on-policy pairs ({c['chosen_from_sample']} chosen sampled, "
              f"{c['chosen_from_reference']} the reference) from {c['greedy_refuted']} refuted greedy answers of "
              f"{len(pair_prompts[task])} training items")
    print(f"   validation greedy accuracy: SFT {on_validation['sft']}, DPO {on_validation['dpo']}")
    return {"pairs": made, "on_policy": counts, "settings": settings, "validation": on_validation,
            "checkpoint": str(folder / "final")}


def stage_grpo(out: Path, args: argparse.Namespace) -> dict:
    recipe = {
        "model": {"path": str(out / "sft" / "final")},
        "data": {"path": str(out / "data" / "grpo_prompts.jsonl"), "prompt_column": "prompt", "max_prompt_tokens": 64},
        # a tool call is 24 tokens long, a sum 3; rows that finish leave the batch
        "rollout": {"prompts_per_step": 16, "num_generations": 8, "max_new_tokens": 28, "temperature": 1.0},
        "dynamic_sampling": {"enabled": True, "max_rounds": 2},
        "loss": {"type": "dapo"},
        # each reward scores its own task's rows (None elsewhere). A call is right or wrong as a whole (what the
        # evaluation counts, and the sample's outcome for dynamic sampling), plus credit per right argument: a
        # 24-token call sampled at temperature 1 is rarely right as a whole, and the binary reward alone left most
        # groups without a signal
        "rewards": {"rewards": [{"name": "math", "weight": 1.0},
                                {"name": "tool_call", "weight": 1.0, "options": TOOL_REWARD_OPTIONS},
                                {"name": "tool_call", "label": "tool_args", "weight": 1.0,
                                 "options": TOOL_REWARD_OPTIONS | {"mode": "arguments"}}],
                    "num_workers": 0},
        # 3e-4 (the math-only demo's rate) collapsed both tasks within 5 steps once tool calls were in the batch
        "optim": {"lr": 1.0e-4, "mini_batches": 2, "micro_batch_tokens": 4096},
        "eval": {"path": str(out / "data" / "held_out.jsonl"), "every_steps": 20, "max_prompts": 64, "num_samples": 1,
                 "temperature": 0.0},
        "checkpoint": {"output_dir": str(out / "grpo")},
        "run": {"steps": 10 if args.quick else 200, "seed": args.seed},
        "logging": {"progress": False},
    }
    _cli("grpo", "--config", _write_recipe(out, "grpo", recipe))
    return {"checkpoint": str(out / "grpo" / "final")}


def stage_export(out: Path, args: argparse.Namespace) -> dict:
    key = out / "signing_key.pem"
    extra = [] if key.exists() else ["--generate-key"]
    _cli("export", "--model", out / "grpo" / "final", "--out", out / "export", "--key", key,
         "--recipe", out / "recipes" / "grpo.yaml", *extra)
    from posttrain.export import load_private_key, public_pem

    public = out / "signing_key.pub.pem"  # the publisher's public key, kept apart from the export it checks
    public.write_bytes(public_pem(load_private_key(key)))
    _cli("verify", out / "export", "--public-key", public)
    return {"checkpoint": str(out / "export"), "signed_with": str(key), "public_key": str(public)}


# ------------------------------------------------------------------------------------------------------------
SAMPLES_PER_ITEM = 4  # sampled evaluation: completions per held-out item at GRPO's training temperature (--quick: 2)
SAMPLE_TEMPERATURE = 1.0
# the reward that decides whether an answer is right, per task (``posttrain.rewards.RewardSpec`` fields)
ACCURACY_REWARDS = {"add": {"name": "math"}, "tool": {"name": "tool_call", "options": TOOL_REWARD_OPTIONS}}


def _accuracy(folder: Path, items: list[dict], samples: int = 1, temperature: float = 0.0,
              seed: int = 0) -> list[float]:
    """Per held-out item, the share of ``samples`` answers its task's reward (``ACCURACY_REWARDS``) accepts (greedy:
    one answer, 0 or 1), scored in this process; a reward that fails on any answer stops the stage with its traceback."""
    from posttrain.rewards import RewardsConfig
    from posttrain.rollout import SamplingParams
    from posttrain.serving.generation import load_checkpoint

    tokenizer, engine = load_checkpoint(folder, None, field="engine")  # the registry's default for the model
    prompts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"] for r in items]
    params = SamplingParams(max_new_tokens=28, temperature=temperature, n=samples, seed=seed,
                            eos_token_id=tokenizer.eos_token_id)
    completions = engine.generate(prompts, params)
    # markup kept (the tool call's tags are special tokens), the end-of-text token dropped
    texts = [tokenizer.decode([t for t in c.token_ids if t != tokenizer.eos_token_id]) for c in completions]
    owners = [items[c.prompt_index] for c in completions]
    hits = [0.0] * len(items)
    for task, spec in ACCURACY_REWARDS.items():
        rewards, _ = RewardsConfig(rewards=[spec], num_workers=0).build()  # num_workers=0: no pool
        mine = [i for i, r in enumerate(owners) if r["task"] == task]
        columns = {k: [owners[i][k] for i in mine] for k in ("answer", "ground_truth", "tool_schema")}
        result = rewards.score([owners[i]["prompt"] for i in mine], [texts[i] for i in mine], **columns)
        result.raise_for_errors()
        for i, score in zip(mine, result.values[spec["name"]], strict=True):
            hits[completions[i].prompt_index] += (score == 1.0) / samples
    return hits


# which stage each one is tested against: DPO and GRPO both start from the SFT checkpoint
BASELINE = {"sft": "base", "dpo": "sft", "grpo": "sft"}


def stage_eval(out: Path, args: argparse.Namespace) -> dict:
    from rich.console import Console

    from posttrain.eval.metrics import permutation_test_p

    items = _read_jsonl(out / "data" / "held_out.jsonl")
    tasks = {"add": [i for i, r in enumerate(items) if r["task"] == "add"],
             "tool": [i for i, r in enumerate(items) if r["task"] == "tool"], "all": list(range(len(items)))}
    stages = {"base": out / "pretrain" / "final", "sft": out / "sft" / "final", "dpo": out / "dpo" / "final",
              "grpo": out / "export"}
    summary: dict = {"held_out": {t: len(v) for t, v in tasks.items()}}
    greedy = {name: _accuracy(folder, items) for name, folder in stages.items()}
    Console().print(_eval_table(f"held-out accuracy (greedy): {len(tasks['add'])} additions and {len(tasks['tool'])} "
                                "tool calls, disjoint from every training item", greedy, tasks, summary))
    per_item = 2 if args.quick else SAMPLES_PER_ITEM
    sampled = {name: _accuracy(folder, items, per_item, SAMPLE_TEMPERATURE, args.seed) for name, folder in stages.items()}
    summary["sampled"] = {"samples_per_item": per_item, "temperature": SAMPLE_TEMPERATURE}
    Console().print(_eval_table(f"the same items, {per_item} sampled answers each at temperature "
                                f"{SAMPLE_TEMPERATURE} (per-item success rates; paired permutation test)",
                                sampled, tasks, summary["sampled"], permutation_test_p))
    summary["curves"] = _plot_curves(out)
    return summary


def _eval_table(title: str, results: dict[str, list[float]], tasks: dict[str, list[int]], summary: dict, test=None):
    """Per stage and task: accuracy, its 95% interval (``accuracy_interval``) and the one-sided paired ``test`` (default
    ``sign_test_p``, whose p is kept beside it either way) against the stage it started from (``BASELINE``), into
    ``summary[stage][task]``."""
    from rich.table import Table

    from posttrain.eval.metrics import accuracy_interval, sign_test_p

    table = Table(title=title)
    table.add_column("model")
    for task, members in tasks.items():
        table.add_column(f"{task} (n={len(members)})")
    for name, hits in results.items():
        cells, summary[name] = [], {}
        baseline = BASELINE.get(name)
        for task, members in tasks.items():
            mine = [hits[i] for i in members]
            mean = sum(mine) / len(mine)
            lo, hi = accuracy_interval(mine)
            p = sign_p = None
            if baseline:
                theirs = [results[baseline][i] for i in members]
                sign_p = sign_test_p(mine, theirs)
                p = (test or sign_test_p)(mine, theirs)
            cells.append(f"{mean:.3f} [{lo:.3f}, {hi:.3f}]" + ("" if p is None else f" p={p:.2g} vs {baseline}"))
            summary[name][task] = {"accuracy": round(mean, 4), "ci95": [round(lo, 4), round(hi, 4)],
                                   "vs": baseline, "p": p, "sign_test_p": sign_p}
        table.add_row(name, *cells)
    return table


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
