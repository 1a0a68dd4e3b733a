"""Downloading a model folder from object storage: pyarrow's default read size vs ray-qlora's, in one run.

Every stage that needs a model off S3 (evaluate's actors, the serve replica,
a base kept in a bucket) copies its folder with ``storage.copy_dir_from``.
This uploads one file of --mib random MiB (a stand-in for a safetensors
shard; 270 MB is SmolLM2-135M merged in bf16) to the embedded S3 server, then
downloads it alternately with pyarrow's default chunk (1 MiB ranged GETs, the
baseline) and with ``copy_dir_from``, --repeats times each, checks the bytes,
and prints the median seconds and their ratio.

    python benchmarks/model_download.py                      # 256 MiB, 3 repeats
    python benchmarks/model_download.py --mib 8 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _timed_copy(copy: Any, dest: Path) -> float:
    started = time.perf_counter()
    copy(dest)
    return time.perf_counter() - started


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import pyarrow.fs as pafs

    from ray_qlora import storage
    from ray_qlora.config import StorageConfig
    from ray_qlora.local_s3 import local_s3_in_env

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=_positive, default=256, help="size of the file downloaded")
    ap.add_argument("--repeats", type=_positive, default=3)
    args = ap.parse_args(argv)

    # its own server: local_s3_in_env points the whole process at it, and back afterwards
    with local_s3_in_env() as store:
        store.create_bucket("bench-download")
        cfg, uri = StorageConfig(endpoint_url=store.endpoint_url), "s3://bench-download/model"
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp, "up")
            src.mkdir()
            payload = os.urandom(args.mib * 2**20)
            (src / "model.safetensors").write_bytes(payload)
            storage.copy_dir_to(src, uri, cfg)
            fs, path = storage.resolve(uri, cfg)
            copies = {
                "pyarrow default (1 MiB reads)": lambda d: pafs.copy_files(
                    path, str(d), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()),
                f"copy_dir_from ({storage.COPY_CHUNK_BYTES // 2**20} MiB reads)": lambda d: storage.copy_dir_from(
                    uri, d, cfg),
            }
            times: dict[str, list[float]] = {k: [] for k in copies}
            digest = hashlib.sha256(payload).hexdigest()
            for i in range(args.repeats):
                for j, (name, copy) in enumerate(copies.items()):  # alternate, so background load hits both alike
                    dest = Path(tmp, f"down-{i}-{j}")
                    dest.mkdir()
                    times[name].append(_timed_copy(copy, dest))
                    got = hashlib.sha256((dest / "model.safetensors").read_bytes()).hexdigest()
                    assert got == digest, f"{name}: downloaded bytes differ"
                    (dest / "model.safetensors").unlink()
    medians = {k: statistics.median(v) for k, v in times.items()}
    base, ours = medians.values()
    for name, secs in medians.items():
        print(f"{name:<32} {secs:8.2f} s  ({args.mib / secs:7.1f} MiB/s)")
    print(f"ratio copy_dir_from / default: {ours / base:.2f}x time ({base / ours:.1f}x faster)")
    return {"mib": args.mib, "seconds": medians, "ratio": ours / base}


if __name__ == "__main__":
    main()
