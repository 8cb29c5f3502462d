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

import numpy as np
import xxhash
from datasketch import MinHash, MinHashLSH
from posttrain.judges.config import DedupConfig, NearDedupConfig

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


def normalize_text(text: str) -> str:
    """The form exact dedup compares: NFKC, case-folded, runs of whitespace collapsed to one space, stripped."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


_MASK64 = (1 << 64) - 1
# Odd 64-bit multipliers, one per position in an n-gram: a shingle's hash is sum(word_hash[k] * _MULT[k]) mod 2**64.
_MULT = np.array([(0x9E3779B97F4A7C15 * (2 * k + 1)) & _MASK64 for k in range(64)], dtype=np.uint64)


class _WordHashes(dict):
    """word -> xxh64 of its UTF-8 bytes, computed once per distinct word (vocabularies repeat a lot)."""

    def __missing__(self, word: str) -> int:
        if len(self) > 2_000_000:  # bound the memory on huge, diverse inputs
            self.clear()
        value = self[word] = xxhash.xxh64_intdigest(word.encode())
        return value


_WORD_HASHES = _WordHashes()


def shingles(text: str, ngram: int, normalized: bool = False) -> np.ndarray:
    """Word n-gram shingles of the normalised text (punctuation dropped), as a sorted array of unique 64-bit hashes.

    Each word is hashed once (xxh64) and an n-gram's hash combines its words' hashes by position, so the set is the
    set of n-grams up to 64-bit collisions (negligible at these sizes).
    """
    if ngram > len(_MULT):
        raise ValueError(f"dedup.near.ngram: at most {len(_MULT)}")
    words = np.fromiter(map(_WORD_HASHES.__getitem__, _WORD.findall(text if normalized else normalize_text(text))),
                        dtype=np.uint64)
    if len(words) == 0:
        return words
    n = min(ngram, len(words))
    count = len(words) - n + 1
    combined = words[:count] * _MULT[0]
    for k in range(1, n):
        combined += words[k : k + count] * _MULT[k]
    return np.unique(combined)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two shingle sets given as sorted unique arrays."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


@dataclass
class Duplicate:
    """Why a sample was dropped: which earlier sample it duplicates, and how closely."""

    kind: str  # "exact" or "near"
    of: int  # index (in the given sequence) of the kept sample it duplicates
    jaccard: float


@dataclass
class Signature:
    """What dedup needs of one text; computed anywhere (worker processes included), compared in one place."""

    digest: bytes  # xxh3-128 of the normalised text
    shingles: np.ndarray | None  # sorted unique shingle hashes (near dedup only)
    minhash: np.ndarray | None  # MinHash signature over the shingles (near dedup only)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, the pre-mix datasketch applies before its affine permutations."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class Signer:
    """Turns texts into Signatures with fixed seeds: the same text gets the same signature in any process.

    MinHash signatures use datasketch's permutations (``MinHash(num_perm, seed).permutations``, scheme affine32)
    and are computed for many texts at once: value for value what ``MinHash.update_batch`` gives (tested), without
    a Python-level call per text.
    """

    def __init__(self, config: DedupConfig, batch: int = 256) -> None:
        self.config = config
        self.batch = batch
        near = config.near
        self._permutations = None
        if near.enabled:
            a, b = MinHash(num_perm=near.num_perm, seed=near.seed, hashfunc=int).permutations
            self._permutations = (np.asarray(a, dtype=np.uint32)[None, :], np.asarray(b, dtype=np.uint32)[None, :])

    def __call__(self, text: str) -> Signature:
        return self.sign_many([text])[0]

    def minhash_many(self, sets: Sequence[np.ndarray]) -> np.ndarray:
        """MinHash signatures (len(sets) x num_perm, uint32) of shingle sets; an empty set gets all 2**32 - 1."""
        assert self._permutations is not None
        a, b = self._permutations
        out = np.full((len(sets), a.shape[1]), np.iinfo(np.uint32).max, dtype=np.uint32)
        for start in range(0, len(sets), self.batch):
            group = [(i, s) for i, s in enumerate(sets[start : start + self.batch], start) if len(s)]
            if not group:
                continue
            values = np.concatenate([s for _, s in group]).astype(np.uint32)  # the low 32 bits of each shingle hash
            permuted = _fmix32(values)[:, None] * a + b  # wraps modulo 2**32, as datasketch's affine32 does
            offsets = np.cumsum([0] + [len(s) for _, s in group[:-1]])
            out[[i for i, _ in group]] = np.minimum.reduceat(permuted, offsets, axis=0)
        return out

    def sign_many(self, texts: Sequence[str]) -> list[Signature]:
        normalized = [normalize_text(t) for t in texts]
        digests = [xxhash.xxh3_128_digest(t.encode("utf-8")) for t in normalized]
        if self._permutations is None:
            return [Signature(d, None, None) for d in digests]
        sets = [shingles(t, self.config.near.ngram, normalized=True) for t in normalized]
        minhashes = self.minhash_many(sets)
        return [Signature(d, s, m) for d, s, m in zip(digests, sets, minhashes)]


class NearDuplicateIndex:
    """MinHash LSH over the kept samples; ``add`` returns the duplicate it finds or inserts the sample."""

    def __init__(self, config: NearDedupConfig) -> None:
        self.config = config
        lsh_threshold = config.lsh_threshold if config.lsh_threshold is not None else max(config.threshold - 0.1, 0.05)
        self.lsh = MinHashLSH(threshold=lsh_threshold, num_perm=config.num_perm)
        # One MinHash object carries each signature into the LSH, which keeps band keys, not the object.
        self._carrier = MinHash(num_perm=config.num_perm, seed=config.seed, hashfunc=int)
        self.kept: dict[int, np.ndarray] = {}

    def add(self, key: int, signature: Signature) -> Duplicate | None:
        assert signature.shingles is not None and signature.minhash is not None
        m = self._carrier
        m.hashvalues = signature.minhash
        sh = signature.shingles
        best: Duplicate | None = None
        for other in sorted(self.lsh.query(m)):  # candidates in input order: the earliest best match is reported
            j = jaccard(sh, self.kept[other])
            if j >= self.config.threshold and (best is None or j > best.jaccard):
                best = Duplicate("near", other, j)
                if j == 1.0:
                    break
        if best is None:
            self.lsh.insert(key, m)
            self.kept[key] = sh
        return best


def deduplicate(texts: Sequence[str], config: DedupConfig,
                signatures: Sequence[Signature] | None = None) -> list[Duplicate | None]:
    """For each text, None if kept, else the earlier kept text it duplicates (signatures may be precomputed)."""
    if signatures is None:
        signatures = Signer(config).sign_many(texts)
    out: list[Duplicate | None] = [None] * len(signatures)
    first_exact: dict[bytes, int] = {}
    near = NearDuplicateIndex(config.near) if config.near.enabled else None
    for i, signature in enumerate(signatures):
        if config.exact:
            if signature.digest in first_exact:
                out[i] = Duplicate("exact", first_exact[signature.digest], 1.0)
                continue
            first_exact[signature.digest] = i
        if near is not None:
            out[i] = near.add(i, signature)
    return out
