"""URIs in, bytes out: every stage reads and writes through here.

A URI is ``s3://bucket/key``, ``file:///abs/path`` or a plain path. S3 goes
through pyarrow's S3FileSystem with an optional endpoint override, so the same
code talks to AWS, MinIO or the local moto server. Credentials are read by
pyarrow/boto3 from the standard AWS environment variables and never logged.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from ray_qlora.config import StorageConfig

__all__ = [
    "COPY_CHUNK_BYTES",
    "RunPaths",
    "copy_dir_from",
    "copy_dir_to",
    "copy_tree",
    "endpoint_url",
    "exists",
    "join",
    "list_files",
    "read_bytes",
    "read_json",
    "remove_tree",
    "resolve",
    "write_bytes",
    "write_figure",
    "write_json",
]

# Bytes per read when copying a folder off object storage. pyarrow reads S3 in
# chunk_size ranged GETs (1 MiB by default): a 270 MB model then takes 270
# requests, each paying S3's first-byte latency, and the embedded moto server
# copies the whole object per range, so it took 52 s against 2.7 s at 64 MiB.
# 32 MiB keeps most of that gain while bounding the buffers of parallel copies.
COPY_CHUNK_BYTES = 32 * 2**20


def endpoint_url(cfg: StorageConfig) -> str | None:
    """The S3 endpoint: the config's, else AWS_ENDPOINT_URL (the variable boto3 reads too)."""
    return cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_filesystem(cfg: StorageConfig) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {"region": cfg.region}
    ep = endpoint_url(cfg)
    if ep:
        parsed = urlparse(ep if "://" in ep else f"http://{ep}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, cfg: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """Split a URI into (filesystem, path inside it)."""
    if uri.startswith("s3://"):
        return _s3_filesystem(cfg), uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}: use s3://, file:// or a plain path")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI without touching its scheme."""
    return posixpath.join(uri.rstrip("/"), *parts)


def exists(uri: str, cfg: StorageConfig) -> bool:
    fs, path = resolve(uri, cfg)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, cfg: StorageConfig) -> bytes:
    fs, path = resolve(uri, cfg)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes, cfg: StorageConfig) -> None:
    fs, path = resolve(uri, cfg)
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_json(uri: str, cfg: StorageConfig) -> Any:
    return json.loads(read_bytes(uri, cfg))


def write_json(uri: str, obj: Any, cfg: StorageConfig) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), cfg)


def write_figure(fig: Any, uri: str, cfg: StorageConfig) -> None:
    """Save a matplotlib figure as PNG to a URI, and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(uri, buf.getvalue(), cfg)


def list_files(uri: str, cfg: StorageConfig, suffixes: tuple[str, ...] = ()) -> list[str]:
    """Files under a URI (or the URI itself if it is a file), as URIs, sorted."""
    fs, path = resolve(uri, cfg)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"nothing at {uri}")
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                 if i.type == pafs.FileType.File]
    prefix = "s3://" if uri.startswith("s3://") else ""
    out = [prefix + i.path for i in infos
           if not suffixes or i.path.endswith(suffixes)]
    return sorted(out)


def copy_dir_to(local_dir: str | Path, uri: str, cfg: StorageConfig) -> None:
    """Upload a local folder's contents to a URI folder."""
    fs, path = resolve(uri, cfg)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def remove_tree(uri: str, cfg: StorageConfig) -> None:
    """Delete a folder and everything in it; nothing to do if it is not there."""
    fs, path = resolve(uri, cfg)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def copy_tree(src_uri: str, dst_uri: str, cfg: StorageConfig) -> None:
    """Copy a folder between two URIs, each on its own filesystem (local, S3)."""
    src_fs, src = resolve(src_uri, cfg)
    dst_fs, dst = resolve(dst_uri, cfg)
    dst_fs.create_dir(dst, recursive=True)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs, chunk_size=COPY_CHUNK_BYTES)


def copy_dir_from(uri: str, local_dir: str | Path | None, cfg: StorageConfig) -> Path:
    """Download a URI folder into a local folder (a new temp folder when None).

    A local URI is returned as it is: no copy is needed to read it.
    """
    fs, path = resolve(uri, cfg)
    if isinstance(fs, pafs.LocalFileSystem) and local_dir is None:
        return Path(path)
    dest = Path(local_dir) if local_dir else Path(tempfile.mkdtemp(prefix="ray-qlora-"))
    dest.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem(),
                    chunk_size=COPY_CHUNK_BYTES)
    return dest


@dataclass(frozen=True)
class RunPaths:
    """The run-folder layout: ``<output_uri>/runs/<run_id>/...``."""

    root: str

    @classmethod
    def for_run(cls, output_uri: str, run_id: str) -> "RunPaths":
        return cls(join(output_uri, "runs", run_id))

    @property
    def run_id(self) -> str:
        return self.root.rstrip("/").rsplit("/", 1)[-1]

    @property
    def gguf(self) -> str:
        return join(self.root, "gguf")

    @property
    def run_json(self) -> str:
        return join(self.root, "run.json")

    @property
    def train(self) -> str:
        return join(self.root, "data", "train")

    @property
    def eval(self) -> str:
        return join(self.root, "data", "eval")

    @property
    def quarantine(self) -> str:
        return join(self.root, "data", "quarantine")

    @property
    def manifest(self) -> str:
        return join(self.root, "data", "manifest.json")

    @property
    def trials(self) -> str:
        return join(self.root, "trials")

    @property
    def merged(self) -> str:
        return join(self.root, "merged")

    @property
    def report(self) -> str:
        return join(self.root, "eval", "report.json")

    @property
    def eval_dir(self) -> str:
        return join(self.root, "eval")
