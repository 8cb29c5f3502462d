"""Preference pairs from verdicts: the model's own answers to each prompt, turned into ``prompt``/``chosen``/``rejected``.

``sample_answers`` draws ``num_samples`` answers per prompt from the model on its rollout engine
(``sampling.engine``, chosen through ``posttrain.rollout.registry``; the native engine prefills each prompt once
and copies its state n ways); ``greedy_answers`` gives its greedy answer. Three ways to pair them
(``PairsConfig.pairing`` and ``verdict.source``):

- ``pairs_on_policy`` (pairing ``on_policy``, reward verdicts): the model's greedy answer, when the reward refutes
  it (score <= ``rejected_max``), is the rejected answer, so DPO pushes down what the model actually says; the
  chosen one is a sampled answer the reward verifies (score >= ``chosen_min``) or, when none is, the data set's
  reference answer in the SFT targets' format (``verdict.reference_answer``), if the reward verifies it. Every prompt
  the model gets wrong gives a pair when a chosen answer exists; ``chosen_from`` in the provenance says which;
- ``pairs_from_judge`` (pairing ``samples``, judge verdicts): every two distinct sampled answers of a prompt are
  judged by ``posttrain filter``'s pairwise judge in both orders (``Judge.compare`` / ``combine_orders``); only a
  pair whose winner is the same in both orders is kept, so a judge that prefers a position gives no pair at all;
- ``pairs_from_rewards`` (pairing ``samples``, reward verdicts): a verifiable reward (``posttrain.rewards``, e.g.
  ``math``) scores each sampled answer; a verified answer is paired with a refuted one; an answer the reward cannot
  score (None) is in no pair.

Each row carries its provenance (which answers, the verdicts or scores, the judge's model and rubric or the
reward's name, the sampling model and seed). ``run_pairs`` writes the rows to a temporary name and renames it,
with a ``.manifest.json`` beside. This module never trains.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.dpo.config import PairSamplingSettings, PairsConfig
from posttrain.provenance import bytes_digest, weights_digest, write_manifest
from posttrain.tokenizer import completion_text
from posttrain.train.data import DataError, Row, check_messages, read_rows


def _as_completion(prompt: Any, text: str) -> Any:
    """An answer in the prompt's format: a string, or one assistant turn for chat prompts."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def prompt_ids(tokenizer, prompt: Any) -> list[int]:
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                  return_dict=True)["input_ids"])
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def sample_answers(engine, tokenizer, prompts: Sequence[Any], sampling: PairSamplingSettings) -> list[list[str]]:
    """``num_samples`` decoded answers per prompt from ``engine``: the text the model wrote, markup included, less
    the closing EOS (:func:`posttrain.tokenizer.completion_text`)."""
    from posttrain.rollout import SamplingParams

    params = SamplingParams(**sampling.sampling_fields(), n=sampling.num_samples, eos_token_id=tokenizer.eos_token_id,
                            seed=sampling.seed)
    completions = engine.generate([prompt_ids(tokenizer, p) for p in prompts], params)
    texts = [completion_text(tokenizer, c.token_ids) for c in completions]
    n = sampling.num_samples
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def greedy_answers(engine, tokenizer, prompts: Sequence[Any], max_new_tokens: int) -> list[str]:
    """The model's greedy (temperature 0) answer to each prompt, decoded as ``sample_answers`` decodes."""
    from posttrain.rollout import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, n=1, eos_token_id=tokenizer.eos_token_id)
    completions = engine.generate([prompt_ids(tokenizer, p) for p in prompts], params)
    return [completion_text(tokenizer, c.token_ids) for c in completions]


def reference_answers(rows: Sequence[Row], template: str) -> list[str]:
    """Each prompt row's reference answer in the SFT targets' format: ``template`` filled with the row's columns."""
    out = []
    for row in rows:
        try:
            out.append(template.format(**row.data))
        except KeyError as e:
            raise DataError(f"{row.source}: verdict.reference_answer {template!r} names column `{e.args[0]}`, which "
                            f"the row does not have (it has: {', '.join(sorted(row.data))})") from None
        except (IndexError, ValueError) as e:
            raise DataError(f"verdict.reference_answer {template!r} is not a format string over the row's named "
                            f"columns: {e}") from None
    return out


def _distinct(answers: Sequence[str]) -> list[int]:
    """Indices of the first occurrence of each distinct, non-blank answer."""
    seen, keep = set(), []
    for i, a in enumerate(answers):
        key = a.strip()
        if key and key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def pairs_from_judge(judge, prompts: Sequence[Any], answers: Sequence[Sequence[str]], max_pairs_per_prompt: int = 1,
                     provenance: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows for the answer pairs that ``judge`` prefers one way in both orders; ties and disagreements are dropped."""
    jobs = [(p, i, j) for p, group in enumerate(answers) for i, j in itertools.combinations(_distinct(group), 2)]
    outcomes = judge.compare([prompts[p] for p, _, _ in jobs],
                             [_as_completion(prompts[p], answers[p][i]) for p, i, _ in jobs],
                             [_as_completion(prompts[p], answers[p][j]) for p, _, j in jobs])
    rows: list[dict[str, Any]] = []
    kept: dict[int, int] = {}
    for (p, i, j), outcome in zip(jobs, outcomes, strict=True):
        if outcome.winner not in ("a", "b") or kept.get(p, 0) >= max_pairs_per_prompt:
            continue
        win, lose = (i, j) if outcome.winner == "a" else (j, i)
        kept[p] = kept.get(p, 0) + 1
        rows.append({
            "prompt": prompts[p], "chosen": _as_completion(prompts[p], answers[p][win]),
            "rejected": _as_completion(prompts[p], answers[p][lose]),
            "provenance": {**(provenance or {}), "source": "judge", "prompt_index": p, "chosen_sample": win,
                           "rejected_sample": lose, "judge_model": judge.model, "rubric": judge.rubric_source,
                           "verdicts": [outcome.first_order.winner, outcome.second_order.winner],
                           "rationales": [outcome.first_order.rationale, outcome.second_order.rationale]},
        })
    return rows


def pairs_from_rewards(prompts: Sequence[Any], answers: Sequence[Sequence[str]],
                       scores: Sequence[Sequence[float | None]], *, chosen_min: float = 1.0,
                       rejected_max: float = 0.0, max_pairs_per_prompt: int = 1, reward_name: str = "reward",
                       provenance: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows pairing verified answers (score >= chosen_min) with refuted ones (score <= rejected_max)."""
    if rejected_max >= chosen_min:
        raise ValueError(f"verdict.rejected_max ({rejected_max}) must be below verdict.chosen_min ({chosen_min})")
    rows: list[dict[str, Any]] = []
    for p, (group, group_scores) in enumerate(zip(answers, scores, strict=True)):
        distinct = _distinct(group)
        good = [i for i in distinct if group_scores[i] is not None and group_scores[i] >= chosen_min]
        bad = [i for i in distinct if group_scores[i] is not None and group_scores[i] <= rejected_max]
        for win, lose in list(itertools.product(good, bad))[:max_pairs_per_prompt]:
            rows.append({
                "prompt": prompts[p], "chosen": _as_completion(prompts[p], group[win]),
                "rejected": _as_completion(prompts[p], group[lose]),
                "provenance": {**(provenance or {}), "source": "reward", "reward": reward_name, "prompt_index": p,
                               "chosen_sample": win, "rejected_sample": lose,
                               "scores": [group_scores[win], group_scores[lose]]},
            })
    return rows


def pairs_on_policy(prompts: Sequence[Any], greedy: Sequence[str], greedy_scores: Sequence[float | None],
                    answers: Sequence[Sequence[str]], scores: Sequence[Sequence[float | None]],
                    references: Sequence[str | None] | None = None,
                    reference_scores: Sequence[float | None] | None = None, *, chosen_min: float = 1.0,
                    rejected_max: float = 0.0, max_pairs_per_prompt: int = 1, reward_name: str = "reward",
                    provenance: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows whose rejected answer is the model's refuted greedy answer and whose chosen one is a verified sample
    (distinct answers, first found first, at most ``max_pairs_per_prompt``) or else the verified reference answer."""
    if rejected_max >= chosen_min:
        raise ValueError(f"verdict.rejected_max ({rejected_max}) must be below verdict.chosen_min ({chosen_min})")
    n = len(prompts)
    references = references if references is not None else [None] * n
    reference_scores = reference_scores if reference_scores is not None else [None] * n

    def verified(score: float | None) -> bool:
        return score is not None and score >= chosen_min

    rows: list[dict[str, Any]] = []
    for p in range(n):
        score = greedy_scores[p]
        if score is None or score > rejected_max:  # right, or nothing the reward can judge: no pair
            continue
        if not greedy[p] and not isinstance(prompts[p], list):  # a string row cannot hold an empty answer
            continue
        wrong = greedy[p].strip()
        chosen = [(answers[p][i], "sample", i, scores[p][i]) for i in _distinct(answers[p])
                  if verified(scores[p][i]) and answers[p][i].strip() != wrong][:max_pairs_per_prompt]
        if not chosen and references[p] is not None and verified(reference_scores[p]):
            chosen = [(references[p], "reference", None, reference_scores[p])]
        for text, origin, sample, chosen_score in chosen:
            rows.append({
                "prompt": prompts[p], "chosen": _as_completion(prompts[p], text),
                "rejected": _as_completion(prompts[p], greedy[p]),
                "provenance": {**(provenance or {}), "source": "reward", "pairing": "on_policy",
                               "reward": reward_name, "prompt_index": p, "rejected_from": "greedy",
                               "chosen_from": origin, "chosen_sample": sample, "scores": [chosen_score, score]},
            })
    return rows


def score_answers(reward_name: str, reward_options: dict[str, Any], rows: Sequence[dict[str, Any]],
                  prompt_field: str, answers: Sequence[Sequence[str]]) -> list[list[float | None]]:
    """The reward's score of every answer; the prompt row's other columns go to the reward (TRL's convention).

    The answers are the model's own, so the reward runs under the reward pool's time limit (``BoundedReward``): an
    answer that sends it into an endless computation, or makes it fail, scores ``None`` and is in no pair."""
    from posttrain.rewards import BoundedReward, get

    reward = get(reward_name, **reward_options)
    flat_prompts, flat_answers, columns = [], [], {}
    names = sorted({k for r in rows for k in r if k != prompt_field})
    for row, group in zip(rows, answers, strict=True):
        for text in group:
            flat_prompts.append(row[prompt_field])
            flat_answers.append(_as_completion(row[prompt_field], text))
            for name in names:
                columns.setdefault(name, []).append(row.get(name))
    with BoundedReward(reward_name, reward) as bounded:
        flat, _ = bounded.score(flat_prompts, flat_answers, columns)  # the pool logs each failure
    n = len(answers[0]) if answers else 0
    return [list(flat[i * n:(i + 1) * n]) for i in range(len(answers))]


@dataclass
class PairsReport:
    prompts: int
    answers: int
    pairs: int
    output: Path
    on_policy: dict[str, int] = field(default_factory=dict)  # pairing on_policy: what became of the greedy answers


def _load_prompt_rows(config: PairsConfig) -> list[Row]:
    rows = read_rows([config.prompts_file], config.max_prompts)
    for row in rows:
        if config.prompt_field not in row.data:
            raise DataError(f"{row.source}: missing field `{config.prompt_field}`")
        value = row.data[config.prompt_field]
        if isinstance(value, list):
            check_messages(value, row.source, config.prompt_field)
        elif not isinstance(value, str) or not value:
            raise DataError(f"{row.source}: field `{config.prompt_field}` must be a non-empty string or chat turns")
    return rows


def run_pairs(config: PairsConfig) -> PairsReport:
    """Sample, judge or score, and write the preference rows and their manifest (atomically)."""
    from transformers import AutoTokenizer

    from posttrain.rollout.registry import build_engine, choose_engine

    if not config.prompts_file:
        raise DataError("prompts_file: name the JSONL/Parquet file of prompts")
    prompt_rows = _load_prompt_rows(config)
    rows = [r.data for r in prompt_rows]
    v, s = config.verdict, config.sampling
    has_model = (Path(s.model) / "config.json").is_file()
    # the engine is checked against the model's family before the judge (whose cache is a file), the model, a row
    engine_spec = choose_engine(s.engine, s.model, field="sampling.engine") if has_model else None
    on_policy = config.pairing == "on_policy"
    references = reference_answers(prompt_rows, v.reference_answer) if on_policy and v.reference_answer else None
    judge = None
    out = Path(config.output)
    if v.source == "judge":  # build (and so check) the judge before any sampling
        from posttrain.judges.config import config_from_dict
        from posttrain.judges.judge import Judge

        judge_cfg = config_from_dict({"judge": {**v.judge, "enabled": True, "mode": "pairwise",
                                                "rubric": v.judge.get("rubric", "pairwise")}}, "verdict.judge").judge
        judge = Judge(judge_cfg, v.judge_cache or str(out) + ".judge_cache.sqlite")
    if engine_spec is None:
        raise FileNotFoundError(f"sampling.model: no checkpoint at {s.model} (no config.json there)")
    tokenizer = AutoTokenizer.from_pretrained(s.tokenizer or s.model)
    engine = build_engine(engine_spec.name, s.model, field="sampling.engine", tokenizer=tokenizer, seed=s.seed)
    prompts = [r[config.prompt_field] for r in rows]
    try:
        answers = sample_answers(engine, tokenizer, prompts, s)
        greedy = greedy_answers(engine, tokenizer, prompts, s.max_new_tokens) if on_policy and judge is None else None
    finally:
        if engine.capabilities.close:
            engine.close()
    provenance = {"generator": str(Path(s.model).resolve()), "generator_sha256": weights_digest(s.model),
                  "sampling_seed": s.seed, "temperature": s.temperature}
    counts: dict[str, int] = {}
    try:
        if judge is not None:
            pairs = pairs_from_judge(judge, prompts, answers, v.max_pairs_per_prompt, provenance)
        elif on_policy:
            greedy_scores = [g[0] for g in score_answers(v.reward, v.reward_options, rows, config.prompt_field,
                                                         [[g] for g in greedy])]
            scores = score_answers(v.reward, v.reward_options, rows, config.prompt_field, answers)
            reference_scores = None
            if references is not None:
                reference_scores = [r[0] for r in score_answers(v.reward, v.reward_options, rows, config.prompt_field,
                                                                [[r] for r in references])]
            pairs = pairs_on_policy(prompts, greedy, greedy_scores, answers, scores, references, reference_scores,
                                    chosen_min=v.chosen_min, rejected_max=v.rejected_max,
                                    max_pairs_per_prompt=v.max_pairs_per_prompt, reward_name=v.reward,
                                    provenance=provenance)
            refuted = [p for p, g in enumerate(greedy_scores) if g is not None and g <= v.rejected_max]
            paired = {r["provenance"]["prompt_index"] for r in pairs}
            counts = {"greedy_refuted": len(refuted), "greedy_verified": sum(
                          g is not None and g >= v.chosen_min for g in greedy_scores),
                      "greedy_unscored": sum(g is None for g in greedy_scores),
                      "refuted_without_pair": len(set(refuted) - paired),
                      "chosen_from_sample": sum(r["provenance"]["chosen_from"] == "sample" for r in pairs),
                      "chosen_from_reference": sum(r["provenance"]["chosen_from"] == "reference" for r in pairs),
                      "references_not_verified": 0 if reference_scores is None else sum(
                          g is None or g < v.chosen_min for g in reference_scores)}
        else:
            scores = score_answers(v.reward, v.reward_options, rows, config.prompt_field, answers)
            pairs = pairs_from_rewards(prompts, answers, scores, chosen_min=v.chosen_min, rejected_max=v.rejected_max,
                                       max_pairs_per_prompt=v.max_pairs_per_prompt, reward_name=v.reward,
                                       provenance=provenance)
    finally:
        if judge is not None:
            judge.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs)
    tmp.write_text(payload, encoding="utf-8")
    os.replace(tmp, out)
    from posttrain.config import config_to_dict

    manifest = {"output": str(out.resolve()), "sha256": bytes_digest(payload),
                "prompts": len(rows), "answers": sum(len(a) for a in answers), "pairs": len(pairs),
                "config": config_to_dict(config), **provenance, **({"on_policy": counts} if counts else {})}
    write_manifest(out.with_name(out.name + ".manifest.json"), manifest)
    return PairsReport(len(rows), sum(len(a) for a in answers), len(pairs), out, counts)
