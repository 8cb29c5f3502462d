"""Dedup on GSM8K's train split: injected exact and near copies are removed, originals never are."""

from __future__ import annotations

import json
import random

from posttrain.judges.config import DedupConfig
from posttrain.judges.dedup import deduplicate, jaccard, normalize_text, shingles


def test_injected_exact_and_near_copies_are_removed_and_no_original_is(shared_data):
    with open(shared_data / "gsm8k" / "train.jsonl") as fh:
        texts = [f"{r['question']}\n{r['answer']}" for r in map(json.loads, fh)]
    assert len(texts) == 7473
    config = DedupConfig()
    ngram = config.near.ngram

    # the originals: GSM8K after its own exact and near duplicates are removed
    first = deduplicate(texts, config)
    originals = [t for t, d in zip(texts, first) if d is None]
    assert len(originals) > 7000

    rng = random.Random(0)
    sources = rng.sample(range(len(originals)), 600)
    exact_sources, near_sources = sources[:300], sources[300:]
    copies: list[tuple[int, str, str]] = []  # (source index, kind, text)
    for i in exact_sources:
        text = originals[i]
        if i % 2:  # exact after normalisation: case and whitespace differ
            text = "  " + text.upper().replace(" ", "   ")
        copies.append((i, "exact", text))
    for i in near_sources:
        words = originals[i].split(" ")
        k = rng.randrange(len(words))
        words[k] = "elephant" if rng.random() < 0.5 else words[k] + "s"
        near = " ".join(words)
        similarity = jaccard(shingles(near, ngram), shingles(originals[i], ngram))
        if 0.9 <= similarity < 1.0:
            copies.append((i, "near", near))
    n_near = sum(1 for _, kind, _ in copies if kind == "near")
    assert n_near >= 200

    # each copy goes at a random place after its source
    slots: dict[int, list[tuple[str, str]]] = {}
    for i, kind, text in copies:
        slots.setdefault(rng.randrange(i, len(originals)), []).append((kind, text))
    combined: list[tuple[str, str]] = []
    for j, text in enumerate(originals):
        combined.append(("original", text))
        combined.extend(slots.get(j, []))

    result = deduplicate([t for _, t in combined], config)
    removed = {"original": 0, "exact": 0, "near": 0}
    for (kind, _), dup in zip(combined, result):
        if dup is not None:
            removed[kind] += 1
            assert combined[dup.of][0] == "original" or dup.kind == "exact"
    assert removed["original"] == 0
    assert removed["exact"] == 300
    assert removed["near"] >= 0.95 * n_near


def test_dedup_is_deterministic_and_keeps_the_first_occurrence():
    base = "Tom has 3 apples and buys 4 more apples at the market on Sunday, so now he has seven apples in his bag."
    near = base.replace("bag", "basket")
    texts = ["unrelated text about the weather in spring", near, base, base.lower(), "another unrelated line"]
    runs = [deduplicate(texts, DedupConfig()) for _ in range(2)]
    assert runs[0] == runs[1]
    result = runs[0]
    assert result[0] is None and result[1] is None and result[4] is None
    assert result[2].kind == "near" and result[2].of == 1 and result[2].jaccard >= 0.8
    assert result[3].kind == "exact" and result[3].of == 2  # exact copy of a sample that was itself a near copy
    assert normalize_text("  A\tb\u00a0C ") == "a b c"


def test_batched_minhash_equals_datasketch_update_batch():
    import numpy as np
    from datasketch import MinHash
    from posttrain.judges.dedup import Signer

    config = DedupConfig()
    signer = Signer(config, batch=3)
    texts = ["the quick brown fox jumps over the lazy dog again and again", "", "a b", "one two three four five six"]
    sets = [shingles(t, config.near.ngram) for t in texts]
    ours = signer.minhash_many(sets)
    for row, sh in zip(ours, sets):
        reference = MinHash(num_perm=config.near.num_perm, seed=config.near.seed, hashfunc=int)
        reference.update_batch((sh & np.uint64(0xFFFFFFFF)).tolist())
        assert np.array_equal(row, reference.hashvalues)
