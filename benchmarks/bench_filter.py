"""Benchmark: rules + exact + near-dup dedup throughput of ``posttrain filter`` on 75,000 chat samples.

The samples are GSM8K train questions and answers as chats, with variations (system prompts, reworded openings,
whitespace/case changes, exact and near copies, looping answers, forbidden phrases, empty answers, broken role
order). Ours runs ``posttrain.judges.pipeline.run_filter`` from a JSONL file to kept/rejected JSONL files. The
anchor, where ``datatrove`` installs, runs the same rules as datatrove pipeline steps (its Gopher repetition filter
and regex filter; lambda filters with the same length, character, language (fastText) and chat checks), then its
exact-dedup and MinHash-dedup pipelines, from the same JSONL file. Both run on one process here. Ends with one JSON
line per measure: ``name``, ``ours``, ``anchor``, ``unit``, ``ratio`` (ours/anchor for throughputs): wall-clock
throughput, and throughput per CPU-second (this machine's two cores are shared, so wall time depends on the load,
printed on stderr). Ours uses ``--workers`` processes (default 2); datatrove gets 2 workers where it has tasks.

Ours runs on all ``--samples`` (75,000, the target's size) and again on the first ``--anchor-samples`` (default
10,000), which datatrove runs too: at its speed here (about 50 samples/s) 75,000 samples would take most of an
hour. The anchor lines compare the two on that same subset; the 75,000-sample line gives datatrove's subset
throughput as its anchor and says so (``anchor_samples``). Each line carries the load average around the runs.

Run: ``python benchmarks/bench_filter.py [--samples 75000] [--anchor-samples 10000] [--no-anchor]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("POSTTRAIN_SHARED_DATA", REPO.parent / "shared" / "data"))

SYSTEMS = [None, "You are a helpful math tutor.", "Answer step by step.", "You are a careful assistant."]
OPENINGS = ["", "Please solve: ", "Question: ", "Help me with this problem. ", "Can you work this out? "]
FORBIDDEN = ["as an ai language model", "i cannot help with that"]

BENCH_CONFIG = {
    "rules": [
        {"name": "length", "min_chars": 10, "max_chars": 8000, "max_tokens": 2000},
        {"name": "repetition"},
        {"name": "characters"},
        {"name": "language", "languages": ["en"], "min_confidence": 0.5},
        {"name": "chat_structure"},
        {"name": "forbidden_patterns", "patterns": FORBIDDEN},
    ],
    "dedup": {"target": "text", "exact": True, "near": {"ngram": 5, "threshold": 0.8, "num_perm": 112}},
}


def build_samples(n: int, seed: int = 0) -> list[dict]:
    with open(SHARED / "gsm8k" / "train.jsonl") as fh:
        base = [json.loads(line) for line in fh]
    rng = random.Random(seed)
    out: list[dict] = []
    while len(out) < n:
        r = base[rng.randrange(len(base))]
        question, answer = r["question"], r["answer"]
        kind = rng.random()
        if kind < 0.05:  # a looping answer
            answer = (answer.split("\n")[0] + "\n") * 12
        elif kind < 0.07:
            answer = f"{FORBIDDEN[rng.randrange(2)].capitalize()}, I think {answer}"
        elif kind < 0.08:
            answer = ""
        elif kind < 0.15:  # near copy: a word changed
            words = answer.split(" ")
            k = rng.randrange(len(words))
            words[k] = words[k] + "s"
            answer = " ".join(words)
        elif kind < 0.2:  # case and whitespace: exact after normalisation
            question = "  " + question.upper()
        messages = []
        system = SYSTEMS[rng.randrange(len(SYSTEMS))]
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": OPENINGS[rng.randrange(len(OPENINGS))] + question})
        messages.append({"role": "assistant", "content": answer})
        if rng.random() < 0.01:
            messages.reverse()
        out.append({"messages": messages, "id": len(out)})
    return out


def run_ours(input_path: Path, workdir: Path, workers: int) -> tuple[float, int]:
    from posttrain.judges.config import config_from_dict
    from posttrain.judges.pipeline import run_filter

    config = config_from_dict(BENCH_CONFIG)
    start = time.perf_counter()
    report = run_filter(config, input_path, workdir / "ours", show_progress=False, workers=workers)
    return time.perf_counter() - start, report.kept


# ------------------------------------------------------------------------------------------------- datatrove


def run_datatrove(input_path: Path, workdir: Path) -> tuple[float, int]:
    import logging

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import GopherRepetitionFilter, LambdaFilter, RegexFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from loguru import logger

    logger.remove()
    logging.disable(logging.WARNING)

    # datatrove 0.10 hands str to xxhash, which xxhash 4 refuses; encode first (the hash itself is unchanged).
    import datatrove.utils.hashes.xxhash as dt_xxhash
    import xxhash

    dt_xxhash.xxhash32 = lambda data: xxhash.xxh32_intdigest(data.encode() if isinstance(data, str) else data)
    dt_xxhash.xxhash64 = lambda data: xxhash.xxh64_intdigest(data.encode() if isinstance(data, str) else data)

    from posttrain.judges.config import CharactersRule, ChatStructureRule, LanguageRule, LengthRule
    from posttrain.judges.rules import CharactersFilter, ChatStructureFilter, LanguageFilter, LengthFilter
    from posttrain.judges.samples import to_sample

    # The same checks as ours, applied through datatrove's LambdaFilter on the document's row.
    cfg = {r["name"]: r for r in BENCH_CONFIG["rules"]}
    strip = lambda d: {k: v for k, v in d.items() if k != "name"}
    length = LengthFilter("length", LengthRule(**strip(cfg["length"])))
    chars = CharactersFilter("characters", CharactersRule())
    lang = LanguageFilter("language", LanguageRule(**strip(cfg["language"])))
    chat = ChatStructureFilter("chat_structure", ChatStructureRule())

    def sample_of(doc):
        return to_sample(0, "", {"messages": doc.metadata["messages"]})

    def adapter(self, data, path, id_in_file):
        messages = data["messages"]
        return {"text": "\n".join(m["content"] for m in messages), "id": str(data["id"]),
                "metadata": {"messages": messages}}

    d = workdir / "datatrove"
    jsonl = lambda p: JsonlReader(str(p), adapter=adapter if p == input_path.parent else None,
                                  glob_pattern="*.jsonl*")
    from posttrain.judges.dedup import normalize_text

    exact_cfg = ExactDedupConfig(content_getter=lambda doc: normalize_text(doc.text).encode())
    mh_cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    stages = [
        [jsonl(input_path.parent),
         LambdaFilter(lambda doc: length.check_one(sample_of(doc)).passed),
         GopherRepetitionFilter(),
         LambdaFilter(lambda doc: chars.check_one(sample_of(doc)).passed),
         LambdaFilter(lambda doc: lang.check_one(sample_of(doc)).passed),
         LambdaFilter(lambda doc: chat.check_one(sample_of(doc)).passed),
         RegexFilter(regex_exp="(?i)" + "|".join(FORBIDDEN)),
         JsonlWriter(str(d / "ruled"))],
        [jsonl(d / "ruled"), ExactDedupSignature(output_folder=str(d / "esig"), config=exact_cfg)],
        [ExactFindDedups(data_folder=str(d / "esig"), output_folder=str(d / "edups"), config=exact_cfg)],
        [jsonl(d / "ruled"), ExactDedupFilter(data_folder=str(d / "edups"), config=exact_cfg),
         JsonlWriter(str(d / "exact"))],
        [jsonl(d / "exact"), MinhashDedupSignature(output_folder=str(d / "msig"), config=mh_cfg)],
        [MinhashDedupBuckets(input_folder=str(d / "msig"), output_folder=str(d / "mbuckets"), config=mh_cfg)],
        [MinhashDedupCluster(input_folder=str(d / "mbuckets"), output_folder=str(d / "mclusters"), config=mh_cfg)],
        [jsonl(d / "exact"), MinhashDedupFilter(input_folder=str(d / "mclusters")), JsonlWriter(str(d / "final"))],
    ]
    start = time.perf_counter()
    for i, steps in enumerate(stages):
        tasks = mh_cfg.num_buckets if i == 5 else 1
        LocalPipelineExecutor(pipeline=steps, tasks=tasks, workers=min(tasks, 2), logging_dir=str(d / f"logs{i}"),
                              skip_completed=False).run()
    elapsed = time.perf_counter() - start
    import gzip

    kept = 0
    for f in (d / "final").glob("*.jsonl*"):
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt") as fh:
            kept += sum(1 for _ in fh)
    return elapsed, kept


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (worker processes included)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(fn, *args) -> tuple[float, float, int]:
    cpu0 = cpu_seconds()
    wall, kept = fn(*args)
    return wall, cpu_seconds() - cpu0, kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=75_000)
    parser.add_argument("--anchor-samples", type=int, default=10_000, help="samples for the like-for-like runs")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 2), help="our rule/signature processes")
    parser.add_argument("--no-anchor", action="store_true", help="skip datatrove")
    args = parser.parse_args()
    n, m = args.samples, min(args.anchor_samples, args.samples)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import emit

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = build_samples(n)
        paths = {}
        for size in {n, m}:
            (work / f"in{size}").mkdir()
            paths[size] = work / f"in{size}" / "samples.jsonl"
            paths[size].write_text("".join(json.dumps(s) + "\n" for s in rows[:size]))
        load = [os.getloadavg()[0]]
        ours = measure(run_ours, paths[n], work / "full", args.workers)
        load.append(os.getloadavg()[0])
        print(f"ours: {n} samples in {ours[0]:.1f}s wall, {ours[1]:.1f}s CPU, {args.workers} workers, kept {ours[2]}",
              file=sys.stderr)
        anchor = None
        if not args.no_anchor:
            try:
                import datatrove  # noqa: F401
            except ImportError as exc:
                print(f"datatrove not available ({exc}); reporting ours alone", file=sys.stderr)
            else:
                ours_m = measure(run_ours, paths[m], work / "subset", args.workers)
                load.append(os.getloadavg()[0])
                with contextlib.redirect_stdout(sys.stderr):  # datatrove prints its stats
                    anchor = measure(run_datatrove, paths[m], work)
                load.append(os.getloadavg()[0])
                print(f"ours: {m} samples in {ours_m[0]:.1f}s wall, {ours_m[1]:.1f}s CPU, kept {ours_m[2]}; "
                      f"datatrove: {anchor[0]:.1f}s wall, {anchor[1]:.1f}s CPU, kept {anchor[2]}", file=sys.stderr)
        loads = {"load_average_1min": [round(x, 2) for x in load], "cpus": os.cpu_count()}
        if anchor is None:
            for name, value, unit in [("filter_rules_exact_near_dedup_throughput", n / ours[0], "samples/s"),
                                      ("filter_rules_exact_near_dedup_throughput_per_cpu_second", n / ours[1],
                                       "samples/CPU-s")]:
                print(json.dumps({"name": name, "ours": round(value, 1), "anchor": None, "unit": unit, "ratio": None,
                                  "samples": n, **loads}))
            return 0
        emit("filter_rules_exact_near_dedup_throughput", n / ours[0], m / anchor[0], "samples/s", True,
             samples=n, anchor_samples=m, **loads)
        emit(f"filter_rules_exact_near_dedup_throughput_{m}", m / ours_m[0], m / anchor[0], "samples/s", True,
             samples=m, **loads)
        emit(f"filter_rules_exact_near_dedup_throughput_per_cpu_second_{m}", m / ours_m[1], m / anchor[1],
             "samples/CPU-s", True, samples=m, **loads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
