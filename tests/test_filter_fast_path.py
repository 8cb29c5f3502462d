"""The fast filter path decides exactly what the straightforward one does.

``run_filter`` (two worker processes, batched repetition statistics, numpy MinHash, its own band tables, orjson)
against a plain re-computation written here: every rule's per-sample ``check_one`` (the repetition rule's is the
Counter-based definition), then exact dedup on the normalised text and near dedup with one datasketch ``MinHash``
and ``MinHashLSH`` per text and Python-set Jaccard, over a few thousand GSM8K chats with near and exact copies and
broken samples mixed in. Every kept/rejected decision, reason and score must be equal.
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from collections import Counter
from pathlib import Path

import xxhash
from datasketch import MinHash, MinHashLSH
from posttrain.judges.config import config_from_dict
from posttrain.judges.pipeline import run_filter
from posttrain.judges.rules import build_rules, target_text
from posttrain.judges.samples import read_samples

CONFIG = {
    "rules": [
        {"name": "length", "min_chars": 10, "max_chars": 4000, "max_tokens": 400},
        {"name": "repetition"},
        {"name": "repetition", "id": "repetition_text", "target": "text", "min_words": 8,
         "max_top_ngram_char_fraction": {1: 0.25, 3: 0.18}, "max_duplicate_ngram_char_fraction": {3: 0.3, 6: 0.14}},
        {"name": "characters", "min_alpha_fraction": 0.5, "max_non_ascii_fraction": 0.02},
        {"name": "language", "languages": ["en"], "min_confidence": 0.5},
        {"name": "chat_structure"},
        {"name": "forbidden_patterns", "patterns": ["as an ai language model", r"i cannot\s+help"]},
    ],
    "dedup": {"target": "text", "exact": True, "near": {"ngram": 5, "threshold": 0.8, "num_perm": 112}},
}
INSERTS = ["é", "中文", "\u00a0", "\x07", "\ufffd", "\n```python\nx = 1\n", "ﬁnance", "İstanbul", "As an AI language model,",
           "\t\t", "x\u200by", "Привет"]


def make_rows(shared_data: Path, n: int, seed: int = 0) -> list[dict]:
    with open(shared_data / "gsm8k" / "train.jsonl") as fh:
        base = [json.loads(line) for _, line in zip(range(1200), fh)]
    rng = random.Random(seed)
    rows: list[dict] = []
    while len(rows) < n:
        r = base[rng.randrange(len(base))]
        question, answer = r["question"], r["answer"]
        kind = rng.random()
        if kind < 0.05:  # a looping answer
            answer = (answer.split("\n")[0] + "\n") * 8
        elif kind < 0.15:  # a near copy: one word changed
            words = answer.split(" ")
            k = rng.randrange(len(words))
            words[k] += "s"
            answer = " ".join(words)
        elif kind < 0.2:  # an exact copy after normalisation
            question = "  " + question.upper()
        elif kind < 0.25:  # odd characters somewhere
            k = rng.randrange(len(answer) + 1)
            answer = answer[:k] + rng.choice(INSERTS) + answer[k:]
        elif kind < 0.26:
            answer = ""
        elif kind < 0.27:
            answer = "Le chat est sur la table, et il reste sept pommes dans le panier de Marie depuis ce matin."
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": "You are a careful math tutor."})
        if rng.random() < 0.01:
            messages.reverse()
        rows.append({"messages": messages, "id": len(rows)})
    return rows


# ------------------------------------------------------------------------------------- the straightforward path


def plain_normalize(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()


def plain_shingles(text: str, n: int) -> set[int]:
    """Word n-gram hashes: xxh64 per word, combined by position with the odd multipliers dedup documents."""
    hashes = [xxhash.xxh64_intdigest(w.encode()) for w in re.findall(r"\w+", plain_normalize(text))]
    if not hashes:
        return set()
    n = min(n, len(hashes))
    mult = [(0x9E3779B97F4A7C15 * (2 * k + 1)) % 2**64 for k in range(n)]
    return {sum(h * m for h, m in zip(hashes[i : i + n], mult)) % 2**64 for i in range(len(hashes) - n + 1)}


def plain_decisions(samples, config) -> list[dict]:
    rules = build_rules(config.rules)
    out = []
    for sample in samples:
        results = [rule.check_one(sample) for rule in rules]
        scores = {k: v for r in results for k, v in r.scores.items()}
        reasons = [why for r in results for why in r.reasons]
        out.append({"kept": not reasons, "stage": "rules" if reasons else None, "reasons": reasons, "scores": scores,
                    "judge": None})
    near = config.dedup.near
    lsh = MinHashLSH(threshold=near.threshold - 0.1, num_perm=near.num_perm)
    first: dict[str, int] = {}
    kept_sets: dict[int, set[int]] = {}
    for sample, decision in zip(samples, out):
        if not decision["kept"]:
            continue
        text = target_text(sample, config.dedup.target)
        key = plain_normalize(text)
        if key in first:
            found = ("exact", first[key], 1.0)
        else:
            first[key] = sample.index
            sh = plain_shingles(text, near.ngram)
            m = MinHash(num_perm=near.num_perm, seed=near.seed, hashfunc=int)
            m.update_batch([h & 0xFFFFFFFF for h in sh])
            found = None
            for other in sorted(lsh.query(m)):
                both = len(sh & kept_sets[other])
                j = both / (len(sh) + len(kept_sets[other]) - both)
                if j >= near.threshold and (found is None or j > found[2]):
                    found = ("near", other, j)
            if found is None:
                lsh.insert(sample.index, m)
                kept_sets[sample.index] = sh
        if found is not None:
            kind, of, j = found
            decision.update(kept=False, stage="dedup")
            decision["scores"][f"dedup.{kind}_jaccard"] = round(j, 6)
            decision["reasons"].append(f"dedup: {kind} duplicate of input row {of} ({samples[of].where}), "
                                       f"jaccard {j:.3f}")
    for decision in out:
        if decision["kept"]:
            decision["reasons"].append("passed all filters")
    return out


def test_fast_filter_decides_exactly_as_the_straightforward_path(tmp_path, shared_data):
    rows = make_rows(shared_data, 2500)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    config = config_from_dict(CONFIG)

    report = run_filter(config, path, tmp_path / "out", show_progress=False, workers=2)
    fast: dict[int, dict] = {}
    for name in ("kept", "rejected"):
        for line in (tmp_path / "out" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            fast[row["id"]] = row.pop("filter_result")
            assert row == rows[row["id"]]  # the row itself comes out as it went in
    samples, _ = read_samples(path)
    plain = plain_decisions(samples, config)

    assert len(fast) == len(rows)
    mismatches = [i for i in range(len(rows)) if fast[i] != json.loads(json.dumps(plain[i]))]
    assert not mismatches, (mismatches[:5], fast[mismatches[0]], plain[mismatches[0]])
    # the sample exercises every path: each rule rejects something, dedup removes near and exact copies
    counts = Counter(report.rejected_by)
    assert all(counts[rule["id"] if "id" in rule else rule["name"]] > 0 for rule in CONFIG["rules"]), counts
    assert counts["dedup_near"] > 100 and counts["dedup_exact"] > 50 and report.kept > 500, counts


def test_batched_repetition_statistics_equal_the_per_text_definition():
    from posttrain.judges.config import RepetitionRule
    from posttrain.judges.rules import RepetitionFilter
    from posttrain.judges.samples import to_sample

    rng = random.Random(1)
    texts = []
    for _ in range(1500):  # small vocabularies: many repeats and many ties between equally frequent n-grams
        vocab = ["a", "bb", "ccc", "dd", "e", "ffff", "g\u00e9"][: rng.randrange(1, 8)]
        texts.append(" ".join(rng.choice(vocab) for _ in range(rng.randrange(0, 90))))
    texts += ["", "one", "\n\n", "x y\nx y\nx y"]
    samples = [to_sample(i, f"mem:{i}", {"prompt": "p", "completion": t}) for i, t in enumerate(texts)]
    options = [RepetitionRule(),
               RepetitionRule(min_words=2, max_top_ngram_char_fraction={1: 0.3, 4: 0.2, 12: 0.1},
                              max_duplicate_ngram_char_fraction={2: 0.5, 3: 0.3, 7: 0.2, 11: 0.1})]
    for option in options:
        rule = RepetitionFilter("repetition", option)
        batched = [r for start in range(0, len(samples), 257) for r in rule.check(samples[start : start + 257])]
        one_by_one = [rule.check_one(s) for s in samples]
        assert [r.__dict__ for r in batched] == [r.__dict__ for r in one_by_one]
        assert 100 < sum(not r.passed for r in batched) < len(samples)


def test_jsonl_values_orjson_would_change_go_through_python_json(tmp_path):
    from posttrain.judges.samples import iter_rows, write_rows

    lines = ['{"messages": [], "big": 123456789012345678901234567890}', '{"messages": [], "x": NaN}',
             '{"messages": [], "s": "\\ud800"}', '{"messages": [], "f": 0.1, "u": "\u00e9"}']
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = [row for _, row in iter_rows(path, "jsonl")]
    assert rows[0]["big"] == 123456789012345678901234567890 and rows[1]["x"] != rows[1]["x"]
    write_rows(rows, tmp_path / "out.jsonl", "jsonl", [type(r) is not dict for r in rows])
    out = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in out[:1] + out[2:]] == [json.loads(x) for x in lines[:1] + lines[2:]]
    assert out[1] == '{"messages": [], "x": NaN}'
