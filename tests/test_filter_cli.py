"""`posttrain filter` end to end: formats in and out, manifest and report, and bad input that names file/line/field
without losing outputs already written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from posttrain.cli import main

CONFIG = """
rules:
  - name: length
    min_chars: 2
  - name: chat_structure
  - name: forbidden_patterns
    patterns: ["as an ai language model"]
dedup:
  exact: true
  near: {ngram: 3, threshold: 0.8}
"""


def rows(shared_data: Path, n: int = 40) -> list[dict]:
    out = []
    with open(shared_data / "gsm8k" / "train.jsonl") as fh:
        for _, line in zip(range(n), fh):
            r = json.loads(line)
            out.append({"messages": [{"role": "user", "content": r["question"]},
                                     {"role": "assistant", "content": r["answer"]}], "answer": r["answer"]})
    out.append(json.loads(json.dumps(out[3])))  # an exact copy
    out.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]})  # too short
    out.append({"messages": [{"role": "user", "content": "q"},
                             {"role": "assistant", "content": "As an AI language model I will not."}]})
    out.append({"messages": [{"role": "assistant", "content": "out of order"}, {"role": "user", "content": "q"}]})
    return out


def write_jsonl(path: Path, data: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "filter.yaml"
    path.write_text(CONFIG)
    return path


def test_jsonl_run_writes_sets_manifest_and_report(tmp_path, shared_data, config_file, capsys):
    data = rows(shared_data)
    write_jsonl(tmp_path / "in.jsonl", data)
    rc = main(["filter", "--config", str(config_file), "--input", str(tmp_path / "in.jsonl"),
               "--output", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    out = tmp_path / "out"
    kept = [json.loads(x) for x in (out / "kept.jsonl").read_text().splitlines()]
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(kept) == 40 and len(rejected) == 4
    assert [r["messages"] for r in kept] == [r["messages"] for r in data[:40]]
    reasons = [r["filter_result"]["reasons"] for r in rejected]
    assert reasons[0][0].startswith("dedup: exact duplicate of input row 3 (") and ":line 4)" in reasons[0][0]
    assert reasons[1] == ["length: 1 chars < min_chars 2"]
    assert reasons[2] == ["forbidden_patterns: matches forbidden pattern 'as an ai language model'"]
    assert reasons[3][0].startswith("chat_structure: turn 0: role 'assistant'")
    assert all(r["filter_result"]["kept"] and r["filter_result"]["scores"]["length.chars"] > 0 for r in kept)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["sha256"] == hashlib.sha256((tmp_path / "in.jsonl").read_bytes()).hexdigest()
    assert manifest["counts"]["rejected_by_filter"] == {"chat_structure": 1, "dedup_exact": 1, "forbidden_patterns": 1,
                                                        "length": 1}
    assert manifest["counts"]["rejected_by_stage"] == {"rules": 3, "dedup": 1, "judge": 0}
    assert manifest["config"]["rules"][0] == {"name": "length", "id": "length", "target": "completion",
                                              "min_chars": 2, "max_chars": None, "min_tokens": None,
                                              "max_tokens": None, "tokenizer": None}
    assert manifest["versions"]["datasketch"] and manifest["started"] <= manifest["finished"]
    assert manifest["outputs_sha256"]["kept"] == hashlib.sha256((out / "kept.jsonl").read_bytes()).hexdigest()
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "40 of 44 kept" in capsys.readouterr().err
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_parquet_and_datasets_round_trip(tmp_path, shared_data, config_file):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = [{"prompt": r["messages"][0]["content"], "completion": r["messages"][1]["content"]}
            for r in rows(shared_data, 20)]
    pq.write_table(pa.Table.from_pylist(data), tmp_path / "in.parquet")
    assert main(["filter", "--config", str(config_file), "--input", str(tmp_path / "in.parquet"),
                 "--output", str(tmp_path / "pq"), "--no-progress"]) == 0
    kept = pq.read_table(tmp_path / "pq" / "kept.parquet").to_pylist()
    rejected = pq.read_table(tmp_path / "pq" / "rejected.parquet").to_pylist()
    assert [r["prompt"] for r in kept] == [r["prompt"] for r in data[:20]]
    # plain strings carry no roles: the out-of-order chat becomes a 1-char completion, rejected by length
    assert [r["filter_result"]["stage"] for r in rejected] == ["dedup", "rules", "rules", "rules"]

    datasets.DatasetDict({"train": datasets.Dataset.from_list(data)}).save_to_disk(str(tmp_path / "ds"))
    assert main(["filter", "--config", str(config_file), "--input", str(tmp_path / "ds"), "--split", "train",
                 "--output", str(tmp_path / "dsout"), "--no-progress"]) == 0
    kept_ds = datasets.load_from_disk(str(tmp_path / "dsout" / "kept"))
    assert kept_ds["prompt"] == [r["prompt"] for r in data[:20]]
    assert all(k["kept"] for k in kept_ds["filter_result"])
    # run again over the existing output folders: swapped whole, same content
    assert main(["filter", "--config", str(config_file), "--input", str(tmp_path / "ds"),
                 "--output", str(tmp_path / "dsout"), "--no-progress"]) == 0
    assert datasets.load_from_disk(str(tmp_path / "dsout" / "kept"))["prompt"] == kept_ds["prompt"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"messages": [{"role": "user", "content": "q"}, \n', r"in\.jsonl:line 3: malformed JSON"),
        ('{"question": "no messages here"}\n', r"in\.jsonl:line 3: field 'messages' missing"),
        ('{"messages": [{"role": "user"}]}\n', r"in\.jsonl:line 3: field messages\[0\]\.content: missing"),
        ('{"prompt": "q"}\n', r"in\.jsonl:line 3: field 'completion' missing"),
    ],
)
def test_bad_input_names_file_line_field_and_loses_nothing(tmp_path, shared_data, config_file, capsys,
                                                           bad_line, message):
    good = rows(shared_data, 5)
    write_jsonl(tmp_path / "in.jsonl", good)
    args = ["filter", "--config", str(config_file), "--input", str(tmp_path / "in.jsonl"),
            "--output", str(tmp_path / "out"), "--no-progress"]
    assert main(args) == 0
    before = _snapshot(tmp_path / "out")
    lines = (tmp_path / "in.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "in.jsonl").write_text("".join(lines[:2]) + bad_line + "".join(lines[2:]))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "posttrain filter: error:" in err
    import re

    assert re.search(message, err), err
    assert _snapshot(tmp_path / "out") == before


def test_unknown_filter_or_option_fails_before_any_work(tmp_path, shared_data, capsys):
    write_jsonl(tmp_path / "in.jsonl", rows(shared_data, 5))
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - name: length\n  - name: profanity\n")
    rc = main(["filter", "--config", str(bad), "--input", str(tmp_path / "in.jsonl"), "--output",
               str(tmp_path / "out")])
    assert rc == 2 and "bad.yaml: rules[1].name: unknown filter 'profanity'" in capsys.readouterr().err
    rc = main(["filter", "--config", str(bad), "--set", "rules.1.name=length", "--set", "rules.1.id=len2",
               "--set", "rules.len2.max_chars=ten", "--input", str(tmp_path / "in.jsonl"), "--output",
               str(tmp_path / "out")])
    assert rc == 2 and "bad.yaml: rules[1].max_chars must be an integer, got 'ten'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_screening_in_worker_processes_matches_one_process(shared_data):
    from posttrain.judges.config import config_from_dict
    from posttrain.judges.dedup import Signer
    from posttrain.judges.pipeline import screen
    from posttrain.judges.rules import build_rules
    from posttrain.judges.samples import to_sample

    config = config_from_dict(__import__("yaml").safe_load(CONFIG))
    samples = [to_sample(i, f"mem:{i}", r) for i, r in enumerate(rows(shared_data, 30))]
    rules = build_rules(config.rules)
    one = list(screen(samples, rules, Signer(config.dedup), "text", workers=1, chunk_size=7))
    two = list(screen(samples, rules, Signer(config.dedup), "text", workers=2, chunk_size=7))
    assert [c.start for c in one] == [c.start for c in two] == list(range(0, len(samples), 7))
    for a, b in zip(one, two):
        assert (a.scores, a.reasons, a.failed, a.digests) == (b.scores, b.reasons, b.failed, b.digests)
        assert all(x.shingles.tolist() == y.shingles.tolist() and x.minhash.tolist() == y.minhash.tolist()
                   for x, y in zip(a.signatures(), b.signatures()))
    signed = [i for c in one for i in c.passed()]
    assert len(signed) == sum(len(c.signatures()) for c in one) == len(samples) - 3
    assert sorted(set(range(len(samples))) - set(signed)) == [31, 32, 33]  # the three a rule rejected
