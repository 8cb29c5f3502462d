"""Exact and near-duplicate removal, deterministic: the first occurrence in input order is kept.

Exact duplicates are found on normalised text (NFKC, case-folded, whitespace collapsed). Near duplicates are found
with MinHash LSH from ``datasketch`` over word n-gram shingles, and every LSH candidate is confirmed by the exact
Jaccard similarity of the two shingle sets (shingles stored as 64-bit hashes), so LSH only decides what to compare,
never what to remove. Seeds are fixed and samples are visited in order, so two runs give the same answer. This
module never reads files or changes samples.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash
from datasketch import MinHash, MinHashLSH
from posttrain.judges.config import DedupConfig, NearDedupConfig

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


def normalize_text(text: str) -> str:
    """The form exact dedup compares: NFKC, case-folded, runs of whitespace collapsed to one space, stripped."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def shingles(text: str, ngram: int) -> set[int]:
    """Word n-gram shingles of the normalised text (punctuation dropped), as 64-bit hashes."""
    words = _WORD.findall(normalize_text(text))
    if len(words) < ngram:
        return {xxhash.xxh64_intdigest(" ".join(words))} if words else set()
    return {xxhash.xxh64_intdigest(" ".join(words[i : i + ngram])) for i in range(len(words) - ngram + 1)}


def jaccard(a: set[int], b: set[int]) -> float:
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


@dataclass
class Duplicate:
    """Why a sample was dropped: which earlier sample it duplicates, and how closely."""

    kind: str  # "exact" or "near"
    of: int  # index (in the given sequence) of the kept sample it duplicates
    jaccard: float


def _low32(value: int) -> int:
    return value & 0xFFFFFFFF


class NearDuplicateIndex:
    """MinHash LSH over the kept samples; ``add`` returns the duplicate it finds or inserts the sample."""

    def __init__(self, config: NearDedupConfig) -> None:
        self.config = config
        lsh_threshold = config.lsh_threshold if config.lsh_threshold is not None else max(config.threshold - 0.1, 0.05)
        self.lsh = MinHashLSH(threshold=lsh_threshold, num_perm=config.num_perm)
        template = MinHash(num_perm=config.num_perm, seed=config.seed, hashfunc=_low32)
        self._permutations = template.permutations
        self._scheme = "affine32"
        self.kept: dict[int, set[int]] = {}

    def _minhash(self, sh: set[int]) -> MinHash:
        m = MinHash(num_perm=self.config.num_perm, seed=self.config.seed, hashfunc=_low32,
                    permutations=self._permutations, scheme=self._scheme)
        m.update_batch(sorted(sh))
        return m

    def add(self, key: int, sh: set[int]) -> Duplicate | None:
        m = self._minhash(sh)
        best: Duplicate | None = None
        for other in sorted(self.lsh.query(m)):  # candidates in input order: the earliest match is reported
            j = jaccard(sh, self.kept[other])
            if j >= self.config.threshold and (best is None or j > best.jaccard):
                best = Duplicate("near", other, j)
                if j == 1.0:
                    break
        if best is None:
            self.lsh.insert(key, m)
            self.kept[key] = sh
        return best


def deduplicate(texts: Sequence[str], config: DedupConfig) -> list[Duplicate | None]:
    """For each text, None if kept, else the earlier kept text it duplicates."""
    out: list[Duplicate | None] = [None] * len(texts)
    first_exact: dict[bytes, int] = {}
    near = NearDuplicateIndex(config.near) if config.near.enabled else None
    for i, text in enumerate(texts):
        if config.exact:
            digest = xxhash.xxh3_128_digest(normalize_text(text).encode("utf-8"))
            if digest in first_exact:
                out[i] = Duplicate("exact", first_exact[digest], 1.0)
                continue
            first_exact[digest] = i
        if near is not None:
            out[i] = near.add(i, shingles(text, config.near.ngram))
    return out
