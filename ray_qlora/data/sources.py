"""Input files: find every file under the configured sources, and read one into raw rows.

``discover`` lists every file under each source (a file, a folder or a glob,
local or ``s3://``, each resolved on its own filesystem) and says of each
whether it will be read or why not, so the manifest can account for every
file. ``plan_parts`` cuts large uncompressed JSONL files into byte ranges,
large Parquet files into runs of row groups and large compressed JSONL files
into interleaved stripes of lines, so one big file is read by many actors.
``read_file`` turns one part into batches of raw rows, one JSON text per
row, and ends with one status record for the part. It never raises for bad
content: a line that is not UTF-8 becomes a row carrying that reason, a
truncated or corrupt file ends with a status naming the problem. Rows are
identified by ``<file index>:<line>`` with the line counted from the start of
the file whatever part read it, so "first occurrence" is well defined
whatever order Ray runs the parts in.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import posixpath
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import pyarrow.fs as pafs

from ray_qlora import storage
from ray_qlora.config import SourceConfig, StorageConfig

__all__ = ["InputFile", "Part", "RAW_COLUMNS", "count_newlines", "discover", "file_kind", "plan_parts", "read_file",
           "row_uid"]

KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
RAW_COLUMNS = ("uid", "path", "source", "line", "record", "raw", "reason")
_CHUNK = 4 << 20  # bytes read at a time from a (decompressed) stream
STRIPE_LINES = 1024  # lines in a block of a compressed file's stripe (see Part)
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class InputFile:
    """One file found under a source; ``skip`` says why it is not read (None: it is)."""

    index: int
    uri: str
    source: int
    kind: str | None
    compression: str | None
    size: int
    mtime: str
    skip: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Part:
    """The share of one file a reader task reads.

    JSON Lines: the lines that start in bytes [start, end); ``first`` is the
    number of newlines before byte ``start - 1`` (0 for the first part), which
    numbers the part's lines as in the whole file. Parquet: row groups
    [start, end); ``first`` is the rows before them. ``end`` -1: to the end.
    Compressed JSON Lines (``of`` > 1): blocks of STRIPE_LINES lines number
    ``index``, ``index + of``, ... (a compressed stream cannot be entered
    mid-way, so each part decompresses all of it and keeps its own stripe:
    decompressing runs hundreds of times faster than rows are processed).
    """

    file: int
    index: int = 0
    start: int = 0
    end: int = -1
    first: int = 0
    of: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def file_kind(name: str) -> tuple[str | None, str | None]:
    """(jsonl|json|parquet, gzip|zstd|None) from a file name; (None, None) for other files."""
    base, compression = name, None
    for suffix, codec in COMPRESSIONS.items():
        if base.endswith(suffix):
            base, compression = base[: -len(suffix)], codec
            break
    for suffix, kind in KINDS.items():
        if base.endswith(suffix):
            if kind == "parquet" and compression:
                return None, None  # Parquet compresses inside the file
            return kind, compression
    return None, None


def _skip_reason(name: str, kind: str | None) -> str | None:
    leaf = posixpath.basename(name)
    if leaf.startswith((".", "_")):
        return "hidden or marker file (name starts with '.' or '_')"
    if kind is None:
        return "unsupported file type; readable: .jsonl/.ndjson/.json (optionally .gz or .zst) and .parquet"
    return None


def _glob_root(pattern: str) -> str:
    """The folder above the first glob character: where listing starts."""
    cut = min((pattern.index(c) for c in _GLOB_CHARS if c in pattern), default=len(pattern))
    return pattern[:cut].rsplit("/", 1)[0]


@dataclass(frozen=True)
class _Entry:
    path: str
    size: int
    mtime: str
    problem: str | None = None  # why it cannot be read at all (a broken link...)


def _walk_local(root: str) -> list[_Entry]:
    """Every entry under a local folder, including those pyarrow's listing leaves out (broken links)."""
    import os

    out = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                out.append(_Entry(path, 0, "", "unreadable: broken symbolic link"))
            elif not os.path.isfile(path):
                out.append(_Entry(path, 0, "", "unreadable: not a regular file"))
            else:
                st = os.stat(path)
                out.append(_Entry(path, st.st_size, str(st.st_mtime_ns)))
    return out


def _list(uri: str, cfg: StorageConfig) -> list[_Entry]:
    """The entries a source names: the file, everything under the folder, or the glob's matches."""
    is_glob = any(c in uri for c in _GLOB_CHARS)
    root_uri = _glob_root(uri) if is_glob else uri
    fs, root = storage.resolve(root_uri, cfg)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data source {uri}: nothing at {root_uri}")
    if info.type == pafs.FileType.File:
        return [_Entry(info.path, int(info.size or 0), str(info.mtime or ""))]
    if isinstance(fs, pafs.LocalFileSystem):
        entries = _walk_local(root)
    else:
        entries = [_Entry(i.path, int(i.size or 0), str(i.mtime or ""))
                   for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File]
    if is_glob:
        _, pattern = storage.resolve(uri, cfg)
        entries = [e for e in entries if fnmatch.fnmatchcase(e.path, pattern)]
    return sorted(entries, key=lambda e: e.path)


def discover(sources: list[SourceConfig], cfg: StorageConfig) -> list[InputFile]:
    """Every file under every source, in config order, each marked read or skipped (with why)."""
    out: list[InputFile] = []
    seen: dict[str, int] = {}
    for s_idx, src in enumerate(sources):
        entries = _list(src.uri, cfg)
        if not entries:
            raise FileNotFoundError(f"data source {src.uri}: no files match")
        prefix = "s3://" if src.uri.startswith("s3://") else ""
        for e in entries:
            kind, compression = file_kind(e.path)
            uri = prefix + e.path
            skip = e.problem or _skip_reason(e.path, kind)
            if skip is None and uri in seen:  # two sources overlap: read the file once
                skip = f"already read as part of data source {seen[uri]}"
            seen.setdefault(uri, s_idx)
            out.append(InputFile(index=len(out), uri=uri, source=s_idx, kind=kind, compression=compression,
                                 size=e.size, mtime=e.mtime, skip=skip))
    return out


def row_uid(file_index: int, line: int) -> str:
    """Sortable identity of a row: file order first, then line (or row) order."""
    return f"{file_index:06d}:{line:09d}"


# Counts the newlines in bytes [start, end) of each (file, start, end): runs them all and returns the counts.
CountAll = Callable[[Sequence[tuple[InputFile, int, int]]], list[int | None]]


def count_newlines(f: InputFile, cfg: StorageConfig, start: int, end: int) -> int | None:
    """Newlines in bytes [start, end) of an uncompressed file; None when it cannot be read (the
    reader then reports it)."""
    try:
        fs, path = storage.resolve(f.uri, cfg)
        with fs.open_input_file(path) as handle:
            handle.seek(start)
            count, left = 0, end - start
            while left > 0 and (chunk := handle.read(min(_CHUNK, left))):
                count += chunk.count(b"\n")
                left -= len(chunk)
            return count
    except Exception:  # noqa: BLE001 - any failure here is the reader's to report, with the file's name
        return None


def _parquet_parts(f: InputFile, cfg: StorageConfig, split_bytes: int) -> list[Part]:
    """Runs of row groups of about ``split_bytes`` (uncompressed) each, numbered by their first row."""
    import pyarrow.parquet as pq

    try:
        fs, path = storage.resolve(f.uri, cfg)
        with fs.open_input_file(path) as handle:
            meta = pq.ParquetFile(handle).metadata
    except Exception:  # noqa: BLE001 - a corrupt footer: read whole, and the reader names the problem
        return [Part(f.index)]
    parts: list[Part] = []
    start = size = rows = first = 0  # the run being gathered: first group, bytes, rows; rows before it
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        rows += meta.row_group(g).num_rows
        if size >= split_bytes or g == meta.num_row_groups - 1:
            parts.append(Part(f.index, len(parts), start, g + 1, first))
            start, size, rows, first = g + 1, 0, 0, first + rows
    return parts or [Part(f.index)]


def plan_parts(files: Sequence[InputFile], cfg: StorageConfig, split_bytes: int,
               count_all: CountAll | None = None) -> list[Part]:
    """The parts every readable file is read in: one for small files and JSON arrays.

    A byte range only becomes a part once the newlines before it are counted
    (``count_all``: in parallel tasks under Ray; sequentially by default),
    so its rows carry their line in the whole file: quarantine and duplicate
    reports point at the real line, and row ids do not depend on the split.
    """
    if count_all is None:
        def count_all(jobs: Sequence[tuple[InputFile, int, int]]) -> list[int | None]:
            return [count_newlines(f, cfg, a, b) for f, a, b in jobs]
    parts: list[Part] = []
    ranged: list[tuple[InputFile, list[int]]] = []
    for f in files:
        if split_bytes <= 0 or f.size <= split_bytes or f.kind not in ("jsonl", "parquet"):
            parts.append(Part(f.index))
        elif f.compression:
            # Stripes are all alike, so rounding down keeps 'auto's two per CPU from becoming
            # 2N + 1 (5 stripes on 2 actors took 68 s where 4 would take about 58).
            n = max(1, f.size // split_bytes)
            parts.extend(Part(f.index, k, of=n) for k in range(n))
        elif f.kind == "parquet":
            parts.extend(_parquet_parts(f, cfg, split_bytes))
        else:
            ranged.append((f, list(range(0, f.size, split_bytes))))
    # Part k > 0 is read from byte start - 1, so that a line starting exactly at ``start`` is told
    # from one running through it; the newlines before that byte number its lines.
    jobs = [(f, max(a - 1, 0), b - 1) for f, starts in ranged for a, b in zip(starts, starts[1:])]
    counts = iter(count_all(jobs))
    for f, starts in ranged:
        got = [next(counts) for _ in starts[1:]]
        if any(c is None for c in got):  # unreadable: one part, whose reader reports the problem
            parts.append(Part(f.index))
            continue
        firsts = [0, *itertools.accumulate(got)]  # newlines before each part's byte start - 1
        ends = [*starts[1:], -1]
        parts.extend(Part(f.index, k, start, end, first)
                     for k, (start, end, first) in enumerate(zip(starts, ends, firsts)))
    return sorted(parts, key=lambda p: (p.file, p.index))


class _Batcher:
    """Collects raw rows of one file part into column batches of at most ``size`` rows."""

    def __init__(self, f: InputFile, part: Part, size: int) -> None:
        self.f, self.part, self.size, self.count = f, part, size, 0
        self.cols: dict[str, list[Any]] = {c: [] for c in RAW_COLUMNS}

    def add(self, line: int, raw: str, reason: str = "") -> dict[str, list[Any]] | None:
        for key, val in (("uid", row_uid(self.f.index, line)), ("path", self.f.uri), ("source", self.f.source),
                         ("line", line), ("record", "row"), ("raw", raw), ("reason", reason)):
            self.cols[key].append(val)
        self.count += 1
        return self.flush() if len(self.cols["uid"]) >= self.size else None

    def flush(self) -> dict[str, list[Any]] | None:
        if not self.cols["uid"]:
            return None
        out, self.cols = self.cols, {c: [] for c in RAW_COLUMNS}
        return out

    def status(self, problem: str) -> dict[str, list[Any]]:
        """The part's closing record: ``line`` holds the rows read, ``reason`` the problem ('' when none)."""
        return {"uid": [f"{self.f.index:06d}:file:{self.part.index:05d}"], "path": [self.f.uri],
                "source": [self.f.source], "line": [self.count], "record": ["file"], "raw": [""],
                "reason": [problem]}


def _lines(stream: Any, number: int = 0, skip_first: bool = False, limit: int = -1,
           stripe: tuple[int, int] = (0, 1)) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes) of every non-blank line of a binary stream, read in chunks.

    ``number``: lines before the stream's first; ``skip_first``: its first line belongs to the part
    before; ``limit`` (not -1): stop at the first line that starts at or after this many bytes in;
    ``stripe`` (k, n): keep only blocks k, k + n, ... of STRIPE_LINES lines.
    """
    own, of = stripe
    rest, offset = b"", 0  # offset: where ``rest`` starts in the stream

    def lines(pieces: list[bytes]) -> Iterator[tuple[int, bytes]]:
        nonlocal number, offset, skip_first
        for piece in pieces:
            if limit != -1 and offset >= limit:
                return
            number, offset = number + 1, offset + len(piece) + 1
            if skip_first:
                skip_first = False
            elif (of == 1 or (number - 1) // STRIPE_LINES % of == own) and piece.strip():
                yield number, piece

    while chunk := stream.read(_CHUNK):
        pieces = (rest + chunk).split(b"\n")
        rest = pieces.pop()
        yield from lines(pieces)
        if limit != -1 and offset >= limit:
            return
    yield from lines([rest])


def _decode(line: bytes) -> tuple[str, str]:
    """(text, reason): the reason is 'not UTF-8' (text then keeps the bytes escaped) or ''."""
    try:
        return line.decode("utf-8").rstrip("\r"), ""
    except UnicodeDecodeError as err:
        return line.decode("utf-8", "backslashreplace"), f"not UTF-8: invalid byte at position {err.start}"


def _read_jsonl(stream: Any, b: _Batcher, **where: Any) -> Iterator[dict[str, list[Any]]]:
    for number, line in _lines(stream, **where):
        text, reason = _decode(line)
        if (out := b.add(number, text, reason)) is not None:
            yield out


def _read_json(data: bytes, b: _Batcher) -> Iterator[dict[str, list[Any]]]:
    """A JSON file: an array of rows or one row. Many '.json' exports are JSON Lines, so
    a file that does not parse whole but whose lines do is read as JSON Lines."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        import io

        yield from _read_jsonl(io.BytesIO(data), b)
        return
    rows = doc if isinstance(doc, list) else [doc]
    for i, row in enumerate(rows):
        if (out := b.add(i + 1, json.dumps(row, ensure_ascii=False))) is not None:
            yield out


def _read_parquet(handle: Any, b: _Batcher) -> Iterator[dict[str, list[Any]]]:
    import pyarrow.parquet as pq

    file = pq.ParquetFile(handle)
    p, number = b.part, b.part.first
    groups = None if p.end == -1 else list(range(p.start, p.end))
    for batch in file.iter_batches(batch_size=b.size, row_groups=groups):
        # to_pylist gives plain Python objects (nested lists of dicts), which json can dump.
        for row in batch.to_pylist():
            number += 1
            if (out := b.add(number, json.dumps(row, ensure_ascii=False, default=str))) is not None:
                yield out


def _read_range(handle: Any, b: _Batcher) -> Iterator[dict[str, list[Any]]]:
    """The lines of a JSON Lines part (see Part): read from byte start - 1, whose line is the part
    before's, to the last line that starts before ``end``."""
    p = b.part
    handle.seek(p.start - 1)
    limit = -1 if p.end == -1 else p.end - p.start + 1
    yield from _read_jsonl(handle, b, number=p.first, skip_first=True, limit=limit)


def read_file(f: InputFile, cfg: StorageConfig, batch_rows: int = 1024,
              part: Part | None = None) -> Iterator[dict[str, list[Any]]]:
    """Batches of raw rows of one file (or one part of it), then its status record; never raises
    for bad content."""
    part = part or Part(f.index)
    b = _Batcher(f, part, batch_rows)
    problem, stage = "", "unreadable"
    try:
        fs, path = storage.resolve(f.uri, cfg)
        if f.kind == "parquet" or part.start > 0:
            with fs.open_input_file(path) as handle:
                stage = "corrupt"
                yield from _read_parquet(handle, b) if f.kind == "parquet" else _read_range(handle, b)
        else:
            with fs.open_input_stream(path, compression=f.compression) as stream:
                stage = "corrupt"
                if f.kind == "jsonl":
                    yield from _read_jsonl(stream, b, limit=part.end, stripe=(part.index, part.of))
                else:
                    yield from _read_json(stream.read(), b)
    except Exception as err:  # noqa: BLE001 - any failure of one file is reported, the others go on
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        # A stripe's count is of its own rows only; the file's total is in the manifest.
        problem = f"{stage}: {detail}" + (f" (after {b.count} rows)" if b.count and part.of == 1 else "")
    if (out := b.flush()) is not None:
        yield out
    yield b.status(problem)
