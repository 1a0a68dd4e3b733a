"""Reading a file in parts (byte ranges, row-group runs, stripes of a compressed stream) gives exactly
the rows of reading it whole, with the same line numbers."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_qlora.config import SourceConfig, StorageConfig
from ray_qlora.data import sources

CFG = StorageConfig()


def _one(path: Path) -> sources.InputFile:
    return sources.discover([SourceConfig(uri=str(path))], CFG)[0]


def _records(f: sources.InputFile, part: sources.Part | None = None) -> list[tuple[Any, ...]]:
    return [row for cols in sources.read_file(f, CFG, 7, part) for row in zip(*cols.values())]


def _read_in_parts(f: sources.InputFile, split_bytes: int) -> tuple[list[tuple[Any, ...]], int, int]:
    """(data rows, rows the parts' status records report, parts) of reading ``f`` in parts."""
    parts = sources.plan_parts([f], CFG, split_bytes)
    got = [r for p in parts for r in _records(f, p)]
    rows = [r for r in got if r[4] == "row"]
    return rows, sum(r[3] for r in got if r[4] == "file"), len(parts)


def _messy_lines(seed: int) -> list[bytes]:
    """Lines of every awkward kind: blank, spaces only, not UTF-8, CRLF, much longer than a part."""
    rng = random.Random(seed)
    out = []
    for i in range(300):
        r = rng.random()
        out.append(b"" if r < 0.1 else b"   " if r < 0.15 else b'{"bad": "\xff"}' if r < 0.2
                   else json.dumps({"long": "x" * rng.randint(100, 3000)}).encode() if r < 0.25
                   else json.dumps({"i": i}).encode() + b"\r" if r < 0.3
                   else json.dumps({"i": i, "s": "y" * rng.randint(0, 50)}).encode())
    return out


@pytest.mark.parametrize("ending", [b"", b"\n", b"\n\n"])
def test_jsonl_in_byte_ranges_reads_every_line_once_with_its_line_number(tmp_path: Path, ending: bytes) -> None:
    data = b"\n".join(_messy_lines(7)) + ending
    (tmp_path / "a.jsonl").write_bytes(data)
    f = _one(tmp_path / "a.jsonl")
    whole = [r for r in _records(f) if r[4] == "row"]
    assert len(whole) > 200 and any(r[6].startswith("not UTF-8") for r in whole)
    # 1 and 2 bytes put a cut inside, just after and just before every newline
    for split in (1, 2, 3, 64, 1000, len(data) - 1):
        rows, reported, n_parts = _read_in_parts(f, split)
        assert n_parts > 1
        assert rows == whole, f"split_bytes={split}"
        assert reported == len(whole)


def test_a_cut_that_falls_on_a_line_start_or_inside_a_line(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(b'{"a": 1}\n{"b": 22}\n{"c": 333}\n')  # lines start at 0, 9 and 19
    f = _one(tmp_path / "a.jsonl")
    parts = sources.plan_parts([f], CFG, 9)
    assert [(p.start, p.end) for p in parts] == [(0, 9), (9, 18), (18, 27), (27, -1)]
    got = [[(r[3], r[5]) for r in _records(f, p) if r[4] == "row"] for p in parts]
    # a line belongs to the part its first byte is in
    assert got == [[(1, '{"a": 1}')], [(2, '{"b": 22}')], [(3, '{"c": 333}')], []]


def test_parquet_in_row_group_runs_keeps_row_numbers(tmp_path: Path) -> None:
    table = pa.Table.from_pylist([{"i": i, "s": "z" * (i % 50)} for i in range(1000)])
    pq.write_table(table, tmp_path / "b.parquet", row_group_size=37)
    f = _one(tmp_path / "b.parquet")
    whole = [r for r in _records(f) if r[4] == "row"]
    assert [r[3] for r in whole] == list(range(1, 1001))
    for split in (1, 5000):
        rows, reported, n_parts = _read_in_parts(f, split)
        assert n_parts > 1 and rows == whole and reported == 1000
    assert _read_in_parts(f, 10**9)[2] == 1


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_compressed_jsonl_in_stripes_reads_every_line_once_with_its_line_number(
        tmp_path: Path, codec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "STRIPE_LINES", 7)  # many blocks of a few hundred lines
    path = tmp_path / f"a.jsonl.{'gz' if codec == 'gzip' else 'zst'}"
    with pa.CompressedOutputStream(str(path), codec) as out:
        out.write(b"\n".join(_messy_lines(11)))
    f = _one(path)
    whole = [r for r in _records(f) if r[4] == "row"]
    for split in (f.size // 5, f.size // 2):
        rows, reported, n_parts = _read_in_parts(f, split)
        assert n_parts > 1
        assert sorted(rows) == whole, f"split_bytes={split}"  # parts interleave: same rows, once each
        assert reported == len(whole)


def test_a_truncated_compressed_file_in_stripes_is_reported_by_each_part_alike(tmp_path: Path) -> None:
    import gzip

    whole_gz = gzip.compress(b"\n".join(json.dumps({"i": i, "pad": "p" * (i % 97)}).encode() for i in range(20000)))
    (tmp_path / "a.jsonl.gz").write_bytes(whole_gz[: len(whole_gz) // 2])
    f = _one(tmp_path / "a.jsonl.gz")
    whole = _records(f)
    parts = sources.plan_parts([f], CFG, f.size // 4)
    got = [_records(f, p) for p in parts]
    assert len(parts) > 3 and all(p[-1][6] == got[0][-1][6] for p in got), "one problem, said alike"
    assert got[0][-1][6].startswith("corrupt:") and whole[-1][6].startswith(got[0][-1][6])
    assert sorted(r for p in got for r in p[:-1]) == whole[:-1], "the rows before the damage, each once"


def test_json_arrays_and_small_files_are_read_whole(tmp_path: Path) -> None:
    (tmp_path / "b.json").write_text(json.dumps([{"a": i} for i in range(500)]))
    (tmp_path / "c.jsonl").write_text('{"a": 1}\n')
    files = sources.discover([SourceConfig(uri=str(tmp_path))], CFG)
    assert [(p.file, p.end, p.of) for p in sources.plan_parts(files, CFG, 64)] == [(0, -1, 1), (1, -1, 1)]
    big = sources.discover([SourceConfig(uri=str(tmp_path / "b.json"))], CFG)
    assert len(sources.plan_parts(big, CFG, 0)) == 1, "0 never splits"


def test_a_file_that_vanished_after_discovery_is_one_part_reported_by_its_reader(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"a": 1}\n' * 100)
    f = _one(tmp_path / "a.jsonl")
    (tmp_path / "a.jsonl").unlink()
    parts = sources.plan_parts([f], CFG, 64)
    assert parts == [sources.Part(f.index)]
    status = _records(f, parts[0])
    assert len(status) == 1 and status[0][6].startswith("unreadable:")
