"""Exact and near-duplicate removal, deterministic: the first occurrence in input order is kept.

Exact duplicates are found on normalised text (NFKC, case-folded, whitespace collapsed). Near duplicates are found
with MinHash LSH over word n-gram shingles: MinHash signatures with ``datasketch``'s permutations (computed for many
texts at once with numpy), banded as ``datasketch.MinHashLSH`` bands them (its band count and width for the
threshold), and every LSH candidate is confirmed by the exact Jaccard similarity of the two shingle sets (shingles
stored as 64-bit hashes), so LSH only decides what to compare, never what to remove. Seeds are fixed and samples
are visited in order, so two runs give the same answer. This module never reads files or changes samples.
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

_WORD = re.compile(r"\w+")
# For ASCII text, \w is [0-9A-Za-z_]: every other byte becomes a space and bytes.split() yields the same words.
_ASCII_NON_WORD = bytes(b if chr(b).isalnum() or b == ord("_") else ord(" ") for b in range(128)) + bytes(128)


def normalize_text(text: str) -> str:
    """The form exact dedup compares: NFKC, case-folded, runs of whitespace collapsed to one space, stripped.

    (``str.split()`` splits on exactly the characters a ``\\s`` regex matches, Unicode included.)
    """
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


_MASK64 = (1 << 64) - 1
# Odd 64-bit multipliers, one per position in an n-gram: a shingle's hash is sum(word_hash[k] * _MULT[k]) mod 2**64.
_MULT = np.array([(0x9E3779B97F4A7C15 * (2 * k + 1)) & _MASK64 for k in range(64)], dtype=np.uint64)


class _WordHashes(dict):
    """UTF-8 word -> its xxh64, computed once per distinct word (vocabularies repeat a lot)."""

    def __missing__(self, word: bytes) -> int:
        if len(self) > 2_000_000:  # bound the memory on huge, diverse inputs
            self.clear()
        value = self[word] = xxhash.xxh64_intdigest(word)
        return value


_WORD_HASHES = _WordHashes()


def word_hashes(normalized: str) -> np.ndarray:
    """xxh64 of each word (``\\w+`` run) of a normalised text, in order."""
    if normalized.isascii():
        words = normalized.encode().translate(_ASCII_NON_WORD).split()
    else:
        words = [w.encode() for w in _WORD.findall(normalized)]
    return np.fromiter(map(_WORD_HASHES.__getitem__, words), dtype=np.uint64, count=len(words))


def _combine(words: np.ndarray, n: int) -> np.ndarray:
    """The hash of every window of ``n`` consecutive words (len(words) - n + 1 values, not deduplicated)."""
    count = len(words) - n + 1
    combined = words[:count] * _MULT[0]
    for k in range(1, n):
        combined += words[k : k + count] * _MULT[k]
    return combined


def shingles(text: str, ngram: int, normalized: bool = False) -> np.ndarray:
    """Word n-gram shingles of the normalised text (punctuation dropped), as a sorted array of unique 64-bit hashes.

    Each word is hashed once (xxh64) and an n-gram's hash combines its words' hashes by position, so the set is the
    set of n-grams up to 64-bit collisions (negligible at these sizes). A text of fewer than ``ngram`` words is one
    shingle of all its words.
    """
    if ngram > len(_MULT):
        raise ValueError(f"dedup.near.ngram: at most {len(_MULT)}")
    words = word_hashes(text if normalized else normalize_text(text))
    if len(words) == 0:
        return words
    return _unique(_combine(words, min(ngram, len(words))))


def _unique(values: np.ndarray) -> np.ndarray:
    """Sorted unique values (``np.unique`` without its generality, which costs more than the work on short arrays)."""
    values = np.sort(values)
    keep = np.empty(len(values), dtype=bool)
    keep[:1] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def shingle_sets(normalized: Sequence[str], ngram: int) -> list[np.ndarray]:
    """``shingles`` of many normalised texts, the n-gram hashes of all of them computed in one pass."""
    if ngram > len(_MULT):
        raise ValueError(f"dedup.near.ngram: at most {len(_MULT)}")
    per_text = [word_hashes(t) for t in normalized]
    lengths = np.fromiter(map(len, per_text), dtype=np.int64, count=len(per_text))
    if len(per_text) == 0:
        return []
    allwords = np.concatenate(per_text) if len(per_text) > 1 else per_text[0]
    combined = _combine(allwords, ngram) if len(allwords) >= ngram else allwords[:0]
    starts = np.cumsum(lengths) - lengths
    out = []
    for words, start, length in zip(per_text, starts.tolist(), lengths.tolist()):
        if length >= ngram:  # windows starting inside this text and ending inside it
            out.append(_unique(combined[start : start + length - ngram + 1]))
        elif length:
            out.append(_unique(_combine(words, length)))
        else:
            out.append(words)
    return out


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two shingle sets given as sorted unique arrays."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    both = np.concatenate((a, b))
    both.sort()
    inter = int(np.count_nonzero(both[1:] == both[:-1]))  # each value occurs at most once in each set
    return inter / (len(a) + len(b) - inter)


@dataclass
class Duplicate:
    """Why a sample was dropped: which earlier sample it duplicates, and how closely."""

    kind: str  # "exact" or "near"
    of: int  # key (index in the given sequence) of the kept sample it duplicates
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
    a Python-level call per text. ``batch`` texts are permuted together (small enough to stay in the CPU cache).
    """

    def __init__(self, config: DedupConfig, batch: int = 32) -> None:
        self.config = config
        self.batch = batch
        near = config.near
        self._permutations = None
        if near.enabled:
            a, b = MinHash(num_perm=near.num_perm, seed=near.seed, hashfunc=int).permutations
            self._permutations = (np.asarray(a, dtype=np.uint32)[:, None], np.asarray(b, dtype=np.uint32)[:, None])

    def __call__(self, text: str) -> Signature:
        return self.sign_many([text])[0]

    def minhash_many(self, sets: Sequence[np.ndarray]) -> np.ndarray:
        """MinHash signatures (len(sets) x num_perm, uint32) of shingle sets; an empty set gets all 2**32 - 1."""
        assert self._permutations is not None
        a, b = self._permutations
        out = np.full((a.shape[0], len(sets)), np.iinfo(np.uint32).max, dtype=np.uint32)  # permutation-major
        for start in range(0, len(sets), self.batch):
            group = [(i, s) for i, s in enumerate(sets[start : start + self.batch], start) if len(s)]
            if not group:
                continue
            values = np.concatenate([s for _, s in group]).astype(np.uint32)  # the low 32 bits of each shingle hash
            permuted = a * _fmix32(values)[None, :]  # wraps modulo 2**32, as datasketch's affine32 does
            permuted += b
            offsets = np.cumsum([0] + [len(s) for _, s in group[:-1]])
            out[:, [i for i, _ in group]] = np.minimum.reduceat(permuted, offsets, axis=1)
        return np.ascontiguousarray(out.T)

    def sign_many(self, texts: Sequence[str]) -> list[Signature]:
        normalized = [normalize_text(t) for t in texts]
        digests = [xxhash.xxh3_128_digest(t.encode("utf-8")) for t in normalized]
        if self._permutations is None:
            return [Signature(d, None, None) for d in digests]
        sets = shingle_sets(normalized, self.config.near.ngram)
        minhashes = self.minhash_many(sets)
        return [Signature(d, s, m) for d, s, m in zip(digests, sets, minhashes)]


class NearDuplicateIndex:
    """The MinHash LSH bands of the kept samples; ``add`` returns the duplicate it finds or inserts the sample.

    The bands are datasketch's: ``MinHashLSH(threshold, num_perm)`` picks the band count and width, and two
    signatures are candidates when all the values of one band are equal, as in its ``query``. The tables here
    hold the bands' bytes directly, so that a whole chunk of signatures is banded with one numpy call.
    """

    def __init__(self, config: NearDedupConfig) -> None:
        self.config = config
        lsh_threshold = config.lsh_threshold if config.lsh_threshold is not None else max(config.threshold - 0.1, 0.05)
        lsh = MinHashLSH(threshold=lsh_threshold, num_perm=config.num_perm)
        self.bands, self.rows = lsh.b, lsh.r
        self.tables: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self.kept: dict[int, np.ndarray] = {}

    def band_keys(self, minhashes: np.ndarray) -> list[list[bytes]]:
        """Each signature's bands as bytes (one row of ``minhashes`` per signature)."""
        used = np.ascontiguousarray(minhashes[:, : self.bands * self.rows], dtype=np.uint32)
        return used.view(np.dtype((np.void, 4 * self.rows))).tolist()

    def add(self, key: int, signature: Signature, bands: list[bytes] | None = None) -> Duplicate | None:
        assert signature.shingles is not None and signature.minhash is not None
        if bands is None:
            bands = self.band_keys(signature.minhash[None, :])[0]
        candidates: set[int] = set()
        for table, band in zip(self.tables, bands):
            hit = table.get(band)
            if hit is not None:
                candidates.update(hit)
        sh = signature.shingles
        best: Duplicate | None = None
        for other in sorted(candidates):  # candidates in input order: the earliest best match is reported
            j = jaccard(sh, self.kept[other])
            if j >= self.config.threshold and (best is None or j > best.jaccard):
                best = Duplicate("near", other, j)
                if j == 1.0:
                    break
        if best is None:
            for table, band in zip(self.tables, bands):
                table.setdefault(band, []).append(key)
            self.kept[key] = sh
        return best


class Deduplicator:
    """Exact, then near dedup, one sample at a time in input order (``check`` keys must increase)."""

    def __init__(self, config: DedupConfig) -> None:
        self.config = config
        self.first_exact: dict[bytes, int] = {}
        self.near = NearDuplicateIndex(config.near) if config.near.enabled else None

    def check_many(self, keys: Sequence[int], signatures: Sequence[Signature]) -> list[Duplicate | None]:
        bands: list[list[bytes] | None] = [None] * len(signatures)
        if self.near is not None and len(signatures):
            bands = self.near.band_keys(np.stack([s.minhash for s in signatures]))
        return [self.check(k, s, b) for k, s, b in zip(keys, signatures, bands)]

    def check(self, key: int, signature: Signature, bands: list[bytes] | None = None) -> Duplicate | None:
        if self.config.exact:
            first = self.first_exact.setdefault(signature.digest, key)
            if first != key:
                return Duplicate("exact", first, 1.0)
        if self.near is not None:
            return self.near.add(key, signature, bands)
        return None


def deduplicate(texts: Sequence[str], config: DedupConfig,
                signatures: Sequence[Signature] | None = None) -> list[Duplicate | None]:
    """For each text, None if kept, else the earlier kept text it duplicates (signatures may be precomputed)."""
    if signatures is None:
        signatures = Signer(config).sign_many(texts)
    dedup = Deduplicator(config)
    out: list[Duplicate | None] = []
    for start in range(0, len(signatures), 4096):
        chunk = signatures[start : start + 4096]
        out.extend(dedup.check_many(range(start, start + len(chunk)), chunk))
    return out
