"""Running an evaluation: generate for each task's items, score through ``posttrain.rewards``, count pass@k.

``evaluate(config, engine)`` is the whole path, whatever produced the texts: items from the task's files,
``engine.generate``, the task's reward (``math``, ``code`` with ``binary=True``, ``tool_call`` with
``mode="binary"``), then pass@k per task. A sample is correct when its reward is 1; a reward of ``None`` (could not
judge) counts as not correct and is reported as ``unscored``, never hidden. Math and tool-call rewards run in a
:class:`~posttrain.rewards.RewardPool` (a stuck sample is killed at the time limit), the code reward in-process, its
sandbox bounding every candidate (``eval_rewards``).
Results are one JSON object (written to a temporary name, then renamed) plus the samples as JSONL.
This module never changes a model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from posttrain.eval.completions import CompletionSource, EvalSampling
from posttrain.eval.metrics import summarize
from posttrain.eval.tasks import TASKS, EvalItem, resolve_tasks
from posttrain.rewards import RewardPool, RewardsConfig, RewardSet, RewardSpec

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """What to evaluate and how."""

    data_dir: str  # folder in the layout of ../shared/data (gsm8k/, humaneval/, bfcl/)
    tasks: list[str] = field(default_factory=lambda: ["gsm8k", "humaneval", "bfcl"])
    split: str = "test"  # GSM8K split file
    limit: int | None = None  # first N items of each task
    sampling: EvalSampling = field(default_factory=EvalSampling)
    ks: list[int] = field(default_factory=lambda: [1])  # pass@k for each k (each <= sampling.n)
    reward_timeout_s: float = 30.0  # per-sample limit for math and tool-call rewards
    reward_workers: int = 2  # reward processes for those rewards (0: in this process, without the time limit)

    def __post_init__(self) -> None:
        self.tasks = resolve_tasks(self.tasks)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if not self.ks:
            raise ValueError("give at least one k for pass@k")
        for k in self.ks:
            if not 1 <= k <= self.sampling.n:
                raise ValueError(f"pass@{k} needs at least {k} samples per item; n is {self.sampling.n} "
                                 "(raise --n, with --temperature > 0)")
        if not Path(self.data_dir).is_dir():
            raise FileNotFoundError(f"data folder not found: {self.data_dir}")


@dataclass
class TaskResult:
    task: str
    items: int
    samples_per_item: int
    metrics: dict[str, float]
    unscored: int  # samples the reward could not judge (counted as not correct)
    seconds: float
    samples: list[dict[str, Any]]  # per item: id, completions, scores

    def summary(self) -> dict[str, Any]:
        return {"items": self.items, "samples_per_item": self.samples_per_item, **self.metrics,
                "unscored": self.unscored, "seconds": round(self.seconds, 3)}


def eval_rewards(task_names: Sequence[str], workers: int = 0, timeout_s: float = 30.0) -> RewardsConfig:
    """The rewards of ``task_names`` as a :class:`RewardsConfig`: each task's reward and options, labelled with the
    task's name; the code reward marked in-process (its sandbox bounds every candidate's time). ``workers`` reward
    processes with a ``timeout_s`` limit per sample when some task's reward runs in them, else none."""
    specs = [RewardSpec(TASKS[name].reward, options=dict(TASKS[name].reward_options), label=name,
                        in_process=TASKS[name].reward == "code") for name in task_names]
    pooled = any(not spec.in_process for spec in specs)
    return RewardsConfig(rewards=specs, num_workers=workers if pooled else 0, timeout_s=timeout_s)


def score_completions(task_name: str, items: Sequence[EvalItem], texts: Sequence[Sequence[str]],
                      pool: RewardPool | None = None, rewards: RewardSet | None = None) -> list[list[float | None]]:
    """The task's reward for every completion (``texts[i]`` are item i's), shaped like ``texts``.

    ``rewards``: a set holding the task's reward under the task's name (``eval_rewards(...).build()``); default: the
    task's reward alone. ``pool``: where rewards not marked in-process run; default: this process.
    """
    if len(texts) != len(items):
        raise ValueError(f"{task_name}: {len(texts)} completion lists for {len(items)} items")
    if rewards is None:
        rewards, _ = eval_rewards([task_name]).build()
    mine = [r for r in rewards.rewards if r.name == task_name]
    if not mine:
        raise ValueError(f"{task_name}: the reward set has no reward for this task; it has "
                         f"{[r.name for r in rewards.rewards]}")
    prompts, completions, owners = [], [], []
    columns: dict[str, list[Any]] = {name: [] for name in items[0].columns} if items else {}
    for i, (item, samples) in enumerate(zip(items, texts, strict=True)):
        for text in samples:
            prompts.append(item.reward_prompt)
            completions.append(text)
            owners.append(i)
            for name, values in columns.items():
                values.append(item.columns[name])
    result = RewardSet(mine).score(prompts, completions, pool, **columns)
    for error in result.errors:
        logger.warning("%s: %s", task_name, error)
    out: list[list[float | None]] = [[] for _ in items]
    for owner, value in zip(owners, result.values[task_name], strict=True):
        out[owner].append(value)
    return out


def evaluate_task(task_name: str, items: list[EvalItem], engine: CompletionSource, config: EvalConfig,
                  pool: RewardPool | None = None, progress: Any = None,
                  rewards: RewardSet | None = None) -> TaskResult:
    start = time.perf_counter()
    texts = engine.generate(items, config.sampling, progress)
    for item, samples in zip(items, texts, strict=True):
        if len(samples) != config.sampling.n:
            raise RuntimeError(f"engine {engine.name!r} returned {len(samples)} completions for item {item.id}, "
                               f"expected n={config.sampling.n}")
    scores = score_completions(task_name, items, texts, pool, rewards)
    correct = [[s is not None and s >= 1.0 for s in item_scores] for item_scores in scores]
    samples = [{"task": task_name, "id": item.id, "completions": list(t), "scores": s}
               for item, t, s in zip(items, texts, scores, strict=True)]
    unscored = sum(s is None for item_scores in scores for s in item_scores)
    return TaskResult(task_name, len(items), config.sampling.n, summarize(correct, config.ks), unscored,
                      time.perf_counter() - start, samples)


def evaluate(config: EvalConfig, engine: CompletionSource, show_progress: bool = True) -> list[TaskResult]:
    """Every task of ``config`` on ``engine``: loads the items, generates, scores, counts."""
    from posttrain.progress import StageProgress

    data_dir = Path(config.data_dir)
    loaded = {name: TASKS[name].load(data_dir, config.split, config.limit) for name in config.tasks}
    for name, items in loaded.items():
        if not items:
            raise ValueError(f"task {name}: no items in {data_dir}")
    results = []
    rewards, pool = eval_rewards(config.tasks, config.reward_workers, config.reward_timeout_s).build()
    try:
        for name, items in loaded.items():
            with StageProgress(f"eval {name}", total=len(items), enabled=show_progress, unit="item") as bar:
                results.append(evaluate_task(name, items, engine, config, pool,
                                             lambda done, b=bar: b.advance(done), rewards))
    finally:
        if pool is not None:
            pool.close()
    return results


def results_json(config: EvalConfig, results: list[TaskResult], model: str, engine: str,
                 prompt_format: str | None) -> dict[str, Any]:
    return {
        "model": model, "engine": engine, "prompt_format": prompt_format, "data_dir": str(config.data_dir),
        "split": config.split, "limit": config.limit, "ks": list(config.ks), "sampling": asdict(config.sampling),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tasks": {r.task: r.summary() for r in results},
    }


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_results(out: Path, summary: dict[str, Any], results: list[TaskResult]) -> Path:
    """The summary JSON at ``out`` and every sample beside it as ``<stem>.samples.jsonl``; returns the latter."""
    samples_path = out.with_name(out.stem + ".samples.jsonl")
    write_atomic(samples_path, "".join(json.dumps(s) + "\n" for r in results for s in r.samples))
    write_atomic(out, json.dumps(summary, indent=2) + "\n")
    return samples_path


def results_table(results: list[TaskResult], ks: Sequence[int]) -> Any:
    from rich.table import Table

    table = Table(title="posttrain eval")
    table.add_column("task")
    table.add_column("items", justify="right")
    table.add_column("n", justify="right")
    for k in ks:
        table.add_column(f"pass@{k}", justify="right")
    table.add_column("unscored", justify="right")
    for r in results:
        cells = [f"{100 * r.metrics[f'pass@{k}']:.1f}% ± {100 * r.metrics[f'pass@{k}_stderr']:.1f}" for k in ks]
        table.add_row(r.task, str(r.items), str(r.samples_per_item), *cells, str(r.unscored))
    return table
