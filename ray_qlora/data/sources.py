"""Input files: find every file under the configured sources, and read one into raw rows.

``discover`` lists every file under each source (a file, a folder or a glob,
local or ``s3://``, each resolved on its own filesystem) and says of each
whether it will be read or why not, so the manifest can account for every
file. ``read_file`` turns one file into batches of raw rows, one JSON text
per row, and ends with one status record for the file. It never raises for
bad content: a line that is not UTF-8 becomes a row carrying that reason, a
truncated or corrupt file ends with a status naming the problem. Rows are
identified by ``<file index>:<line>``, so "first occurrence" is well defined
whatever order Ray runs the files in.
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import pyarrow.fs as pafs

from ray_qlora import storage
from ray_qlora.config import SourceConfig, StorageConfig

__all__ = ["InputFile", "RAW_COLUMNS", "discover", "file_kind", "read_file", "row_uid"]

KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
RAW_COLUMNS = ("uid", "path", "source", "line", "record", "raw", "reason")
_CHUNK = 4 << 20  # bytes read at a time from a (decompressed) stream
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


class _Batcher:
    """Collects raw rows of one file into column batches of at most ``size`` rows."""

    def __init__(self, f: InputFile, size: int) -> None:
        self.f, self.size, self.count = f, size, 0
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
        """The file's closing record: ``line`` holds the rows read, ``reason`` the problem ('' when none)."""
        return {"uid": [f"{self.f.index:06d}:file"], "path": [self.f.uri], "source": [self.f.source],
                "line": [self.count], "record": ["file"], "raw": [""], "reason": [problem]}


def _lines(stream: Any) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes) of every non-blank line of a binary stream, read in chunks."""
    rest, number = b"", 0
    while chunk := stream.read(_CHUNK):
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for part in parts:
            number += 1
            if part.strip():
                yield number, part
    if rest.strip():
        yield number + 1, rest


def _decode(line: bytes) -> tuple[str, str]:
    """(text, reason): the reason is 'not UTF-8' (text then keeps the bytes escaped) or ''."""
    try:
        return line.decode("utf-8").rstrip("\r"), ""
    except UnicodeDecodeError as err:
        return line.decode("utf-8", "backslashreplace"), f"not UTF-8: invalid byte at position {err.start}"


def _read_jsonl(stream: Any, b: _Batcher) -> Iterator[dict[str, list[Any]]]:
    for number, line in _lines(stream):
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

    number = 0
    for batch in pq.ParquetFile(handle).iter_batches(batch_size=b.size):
        # to_pylist gives plain Python objects (nested lists of dicts), which json can dump.
        for row in batch.to_pylist():
            number += 1
            if (out := b.add(number, json.dumps(row, ensure_ascii=False, default=str))) is not None:
                yield out


def read_file(f: InputFile, cfg: StorageConfig, batch_rows: int = 1024) -> Iterator[dict[str, list[Any]]]:
    """Batches of raw rows of one file, then its status record; never raises for bad content."""
    b = _Batcher(f, batch_rows)
    problem, stage = "", "unreadable"
    try:
        fs, path = storage.resolve(f.uri, cfg)
        if f.kind == "parquet":
            with fs.open_input_file(path) as handle:
                stage = "corrupt"
                yield from _read_parquet(handle, b)
        else:
            with fs.open_input_stream(path, compression=f.compression) as stream:
                stage = "corrupt"
                if f.kind == "jsonl":
                    yield from _read_jsonl(stream, b)
                else:
                    yield from _read_json(stream.read(), b)
    except Exception as err:  # noqa: BLE001 - any failure of one file is reported, the others go on
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        problem = f"{stage}: {detail}" + (f" (after {b.count} rows)" if b.count else "")
    if (out := b.flush()) is not None:
        yield out
    yield b.status(problem)
