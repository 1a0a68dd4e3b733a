"""Dedup keys and their resolution, without Ray: exact and near duplicates found, templated facts kept."""

from __future__ import annotations

import json
import re

from ray_qlora.config import DedupConfig
from ray_qlora.data.dedup import batch_dedup_keys, dedup_keys, lsh_params, normalise, resolve, signatures
from ray_qlora.data.sample import make_orders

CFG = DedupConfig()


def _resolve(convs: dict[str, list[dict[str, str]]], cfg: DedupConfig = CFG) -> dict[str, tuple[str, str]]:
    """What prepare does through Ray Data, in plain Python: group uids by key, resolve groups."""
    groups: dict[int, list[str]] = {}
    for uid, msgs in convs.items():
        for key in dedup_keys(msgs, cfg):
            groups.setdefault(key, []).append(uid)
    shared = [g for g in groups.values() if len(g) > 1]
    return resolve(shared, {u: (u, convs[u]) for g in shared for u in g}, cfg)


def _chat(q: str, a: str = "ok") -> list[dict[str, str]]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_lsh_bands_come_from_datasketch_for_the_threshold() -> None:
    bands, rows = lsh_params(0.9, 128)
    assert bands * rows <= 128 and rows > 1


def test_batched_signatures_are_datasketchs_minhash() -> None:
    """Many rows in one numpy pass give exactly datasketch's per-row MinHash values, across chunk edges."""
    import zlib

    import numpy as np
    from datasketch import MinHash

    from ray_qlora.data import dedup

    texts = ["", "one", "two words", "a b c", *(f"order {i}: " + " ".join(f"w{j % (i + 3)}" for j in range(i * 7))
                                              for i in range(60))]
    cfg = DedupConfig(num_perm=64, shingle_size=2)
    dedup._CHUNK_SHINGLES, saved = 50, dedup._CHUNK_SHINGLES  # many chunks, some rows larger than one
    try:
        got = signatures(texts, cfg)
    finally:
        dedup._CHUNK_SHINGLES = saved
    for text, sig in zip(texts, got):
        words = re.findall(r"\w+", text)
        shingles = [" ".join(words[i:i + 2]).encode() for i in range(max(1, len(words) - 1))]
        m = MinHash(num_perm=64, seed=1, scheme="affine32", hashfunc=zlib.crc32)
        m.update_batch(shingles)
        assert np.array_equal(sig, m.hashvalues), text
    convs = [_chat(t) for t in texts[:10]]
    assert batch_dedup_keys(convs, CFG) == [dedup_keys(c, CFG) for c in convs]
    assert signatures([normalise(convs[5])], CFG).shape == (1, 128)


def test_exact_duplicates_fold_case_and_spacing_and_keep_the_first() -> None:
    out = _resolve({"001": _chat("Give 5 mg"), "000": _chat("give  5 MG"), "002": _chat("give 6 mg")})
    assert out == {"001": ("000", "exact duplicate of 000")}


def test_tool_calls_with_different_arguments_are_not_duplicates() -> None:
    def called(city: str) -> list[dict]:
        return [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}]}]

    out = _resolve({"a": called("Oslo"), "b": called("Lima"), "c": called("Oslo")}, DedupConfig(near=False))
    assert out == {"c": ("a", "exact duplicate of a")}


def test_near_duplicate_found_above_threshold_only() -> None:
    text = " ".join(f"w{i}" for i in range(100))
    out = _resolve({"a": _chat(text), "b": _chat(text.replace("w40", "changed")),
                    "c": _chat(" ".join(f"w{i}" for i in range(60)))})
    assert set(out) == {"b"} and out["b"][0] == "a" and out["b"][1].startswith("near-duplicate")
    assert _resolve({"a": _chat(text), "b": _chat(text.replace("w40", "changed"))},
                    DedupConfig(near=False)) == {}


def test_templated_rows_that_differ_in_facts_are_kept() -> None:
    """The sample task: orders from a few templates, differing in drug, dose, route, frequency.

    None may be taken for a near-duplicate; only rows equal after case and
    space folding may go, and those must be exact duplicates."""
    convs = {f"{i:04d}": _chat(o["order"], o["json"]) for i, o in enumerate(make_orders(400, seed=3))}
    out = _resolve(convs)
    folded = {" ".join(json.dumps(c).lower().split()) for c in convs.values()}
    assert len(out) == len(convs) - len(folded)
    assert all(reason.startswith("exact duplicate") for _, reason in out.values())
