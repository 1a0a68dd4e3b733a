"""Exact and near-duplicate detection that scales: integer keys per row, only collisions resolved.

Each row gets a list of keys (computed in parallel, in the row actors):

- a hash of its normalised text (case and whitespace folded): equal keys
  are exact duplicates;
- a hash of band i of its MinHash signature (word shingles; the values of
  datasketch's MinHash, computed for a batch of rows at once; bands and
  rows per band from datasketch's MinHashLSH for the configured
  threshold): rows sharing a band key are near-duplicate candidates.

prepare counts the keys (only the 64-bit key column reaches the driver;
numpy counts millions in under a second), then fetches just the rows that
hold a key shared with another row. ``resolve`` verifies those candidates
(equal normalised text, or the estimated Jaccard similarity of the two
signatures at or above the threshold), joins verified pairs into groups,
and keeps the first row of each group by uid (file order, then line
order). So the driver holds keys and the colliding rows, never the dataset.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from functools import lru_cache
from itertools import chain
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ray_qlora.config import DedupConfig

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Duplicate", "batch_dedup_keys", "dedup_keys", "lsh_params", "normalise", "resolve", "signatures"]

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+", re.UNICODE)
Duplicate = tuple[str, str]  # (uid of the row kept, reason)
_SCHEME = "affine32"  # datasketch 2's default permutation scheme, named because shared permutations need it
# Shingles are hashed to 32 bits with CRC-32 (C, deterministic across processes) instead of
# datasketch's default SHA-1: hashing was most of the cost of a signature, and MinHash only
# needs shingle hashes spread evenly, not cryptographic ones.


def normalise(messages: list[dict[str, Any]]) -> str:
    """The text two rows must share to be exact duplicates: roles, contents and tool calls, case and spacing
    folded (two rows calling one function with different arguments are different rows)."""
    return "\n".join(f"{m['role']}: {_WS.sub(' ', _said(m)).strip().lower()}" for m in messages)


def _said(message: dict[str, Any]) -> str:
    calls = [[c["function"]["name"], c["function"]["arguments"]] for c in message.get("tool_calls", [])]
    return message["content"] + (" " + json.dumps(calls, sort_keys=True, ensure_ascii=False) if calls else "")


def _shingle_hashes(text: str, size: int) -> list[int]:
    """CRC-32 of each word shingle of the text (one shingle of all its words if it has fewer than size)."""
    words = _WORD.findall(text)
    if len(words) <= size:
        return [zlib.crc32(" ".join(words).encode())]
    return [zlib.crc32(" ".join(words[i:i + size]).encode()) for i in range(len(words) - size + 1)]


@lru_cache(maxsize=8)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH picks for this threshold."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return int(lsh.b), int(lsh.r)


@lru_cache(maxsize=8)
def _permutations(num_perm: int) -> Any:
    # Generating the permutations is the slow part of a MinHash; share them.
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=1, scheme=_SCHEME, hashfunc=zlib.crc32).permutations


def _fmix32(hv: "np.ndarray") -> "np.ndarray":
    """MurmurHash3's 32-bit finalizer, which datasketch's affine32 scheme applies to each hash first."""
    import numpy as np

    hv = hv ^ (hv >> np.uint32(16))
    hv = hv * np.uint32(0x85EBCA6B)
    hv = hv ^ (hv >> np.uint32(13))
    hv = hv * np.uint32(0xC2B2AE35)
    return hv ^ (hv >> np.uint32(16))


_CHUNK_SHINGLES = 8192  # shingles per numpy pass: 4 MiB of uint32 at 128 permutations


def signatures(texts: Sequence[str], cfg: DedupConfig) -> "np.ndarray":
    """MinHash signatures (rows x num_perm, uint32) of the texts' word shingles.

    The values are exactly datasketch's (``MinHash(scheme="affine32",
    hashfunc=zlib.crc32, seed=1).update_batch(shingles)``; a test holds them
    equal), computed for many rows in one numpy pass: one MinHash object per
    row cost about 180 us of set-up and small-array calls, most of a row's
    dedup time and about a sixth of all its processing.
    """
    import numpy as np

    a, b = (np.asarray(p, dtype=np.uint32) for p in _permutations(cfg.num_perm))
    hashes = [_shingle_hashes(t, cfg.shingle_size) for t in texts]  # each row has at least one
    lengths = np.array([len(h) for h in hashes], dtype=np.int64)
    flat = _fmix32(np.fromiter(chain.from_iterable(hashes), dtype=np.uint32, count=int(lengths.sum())))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    out = np.empty((len(texts), cfg.num_perm), dtype=np.uint32)
    row = 0
    while row < len(texts):  # the rows whose shingles fill one pass, at least one row
        stop = max(row + 1, int(np.searchsorted(ends, starts[row] + _CHUNK_SHINGLES, side="right")))
        lo, hi = starts[row], ends[stop - 1]
        # uint32 products wrap, which is the scheme's arithmetic (mod 2**32)
        out[row:stop] = np.minimum.reduceat(flat[lo:hi, None] * a + b, starts[row:stop] - lo, axis=0)
        row = stop
    return out


def _key(kind: bytes, data: bytes) -> int:
    """A signed 64-bit key: Ray Data groups integers far faster than strings."""
    return int.from_bytes(hashlib.blake2b(kind + data, digest_size=8).digest(), "little", signed=True)


def dedup_keys(messages: list[dict[str, str]], cfg: DedupConfig) -> list[int]:
    """The keys of one row: its exact key, then one key per LSH band."""
    return batch_dedup_keys([messages], cfg)[0]


def batch_dedup_keys(convs: Sequence[list[dict[str, str]]], cfg: DedupConfig) -> list[list[int]]:
    """Each row's keys, as ``dedup_keys``, with the signatures of all rows computed together."""
    texts = [normalise(m) for m in convs]
    keys: list[list[int]] = [[_key(b"x", t.encode())] if cfg.exact or cfg.near else [] for t in texts]
    if cfg.near and texts:
        bands, rows = lsh_params(cfg.near_threshold, cfg.num_perm)
        for row_keys, sig in zip(keys, signatures(texts, cfg)):
            row_keys += [_key(b"b%d" % i, sig[i * rows:(i + 1) * rows].tobytes()) for i in range(bands)]
    return keys


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:  # path compression
            self.parent[x], x = root, self.parent.get(x, x)
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller uid (earlier row) becomes the root: it is the one kept
            lo, hi = sorted((ra, rb))
            self.parent[hi] = lo


def _similarity(a: "np.ndarray", b: "np.ndarray") -> float:
    import numpy as np

    return float(np.mean(a == b))


def resolve(groups: Iterable[list[str]], rows: dict[str, tuple[str, list[dict[str, str]]]],
            cfg: DedupConfig) -> dict[str, Duplicate]:
    """Colliding groups of uids -> {uid of a dropped row: (uid kept, reason)}.

    ``groups`` are the uids sharing one key; ``rows`` maps each uid to
    (location for messages, its messages). Candidate pairs within a group are
    verified before they are joined, so an LSH false positive drops nothing.
    """
    texts = {uid: normalise(msgs) for uid, (_, msgs) in rows.items()}
    # near-duplicates need signatures; all of them in one pass (see signatures)
    sigs = dict(zip(texts, signatures(list(texts.values()), cfg))) if cfg.near else {}

    uf = _UnionFind()
    for group in groups:
        members = sorted(set(group))
        # all pairs in small groups; against the first member only in big ones (bounded work)
        pairs = ([(a, b) for i, a in enumerate(members) for b in members[i + 1:]] if len(members) <= 32
                 else [(members[0], b) for b in members[1:]])
        for a, b in pairs:
            same = texts[a] == texts[b]  # an exact duplicate is also a near one (similarity 1)
            if same or (cfg.near and _similarity(sigs[a], sigs[b]) >= cfg.near_threshold):
                uf.union(a, b)
    out: dict[str, Duplicate] = {}
    for uid in sorted(uf.parent):
        kept = uf.find(uid)
        if kept == uid:
            continue
        where = rows[kept][0]
        if texts[uid] == texts[kept]:
            out[uid] = (kept, f"exact duplicate of {where}")
        else:
            sim = _similarity(sigs[uid], sigs[kept])
            out[uid] = (kept, f"near-duplicate (estimated Jaccard {sim:.2f}) of {where}")
    return out
