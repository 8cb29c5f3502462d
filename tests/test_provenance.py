"""posttrain.provenance: the manifest writer's two forms, its atomic write, and what a manifest records of a data
file and of the library versions."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.provenance import bytes_digest, data_provenance, file_digest, versions, write_manifest

DATA = {"zeta": 1, "alpha": {"name": "naïve ✓", "values": [1.5, None, True]}, "path": Path("/data/x.jsonl")}


def test_canonical_manifest_sorts_keys_escapes_text_and_returns_what_it_wrote(tmp_path):
    body = write_manifest(tmp_path / "manifest.json", DATA)
    assert (tmp_path / "manifest.json").read_bytes() == body
    assert body == (json.dumps(DATA, indent=2, sort_keys=True, default=str) + "\n").encode()
    assert body.isascii() and body.index(b'"alpha"') < body.index(b'"zeta"')
    assert json.loads(body)["path"] == "/data/x.jsonl"  # a value JSON has no form for: its str
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # the temporary sibling was renamed


def test_readable_manifest_keeps_key_order_and_text(tmp_path):
    data = {k: v for k, v in DATA.items() if k != "path"}
    write_manifest(tmp_path / "manifest.json", data, canonical=False)
    text = (tmp_path / "manifest.json").read_text(encoding="utf-8")
    assert text == json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    assert text.index('"zeta"') < text.index('"alpha"') and "naïve ✓" in text


def test_write_replaces_an_existing_manifest_whole(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("{\"old\": true}\n")
    write_manifest(path, {"new": True})
    assert json.loads(path.read_text()) == {"new": True}


def test_data_provenance_names_the_file_and_the_manifest_beside_it(tmp_path):
    rows = tmp_path / "kept.jsonl"
    rows.write_text('{"text": "a"}\n')
    assert data_provenance(str(rows)) == {"path": str(rows.resolve()), "sha256": bytes_digest('{"text": "a"}\n')}
    write_manifest(tmp_path / "manifest.json", {"counts": {"kept": 1}}, canonical=False)
    entry = data_provenance(str(rows))
    assert entry["manifest"] == str((tmp_path / "manifest.json").resolve())
    assert entry["manifest_sha256"] == file_digest(tmp_path / "manifest.json")


def test_versions_name_posttrain_and_the_training_libraries():
    import torch

    import posttrain

    found = versions()
    assert set(found) == {"posttrain", "torch", "transformers", "accelerate"}
    assert found["posttrain"] == posttrain.__version__ and found["torch"] == torch.__version__
