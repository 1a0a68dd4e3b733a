"""URIs: local paths and s3:// against the local S3 server behave the same."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_qlora import storage
from ray_qlora.config import StorageConfig

CFG = StorageConfig()


def test_unsupported_scheme() -> None:
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        storage.resolve("gs://bucket/x", CFG)


def test_run_paths_layout() -> None:
    run = storage.RunPaths.for_run("s3://b/out/", "r1")
    assert run.root == "s3://b/out/runs/r1"
    assert run.train == "s3://b/out/runs/r1/data/train"
    assert run.run_json.endswith("/runs/r1/run.json")


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_roundtrip_list_and_copy(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if kind == "s3":
        request.getfixturevalue("local_s3").create_bucket("storage-test")
        root = "s3://storage-test/x"
    else:
        root = f"file://{tmp_path}/x"
    storage.write_json(storage.join(root, "a", "one.json"), {"k": 1}, CFG)
    storage.write_bytes(storage.join(root, "a", "two.txt"), b"hi", CFG)
    assert storage.read_json(storage.join(root, "a", "one.json"), CFG) == {"k": 1}
    listed = storage.list_files(root, CFG, (".json",))
    assert len(listed) == 1 and listed[0].endswith("a/one.json")
    assert storage.exists(storage.join(root, "a", "two.txt"), CFG)
    assert not storage.exists(storage.join(root, "nope"), CFG)
    local = storage.copy_dir_from(storage.join(root, "a"), tmp_path / "down", CFG)
    assert (local / "two.txt").read_bytes() == b"hi"
    with pytest.raises(FileNotFoundError):
        storage.list_files(storage.join(root, "missing"), CFG)


def test_copy_dir_from_s3_spans_many_reads_intact(local_s3, tmp_path: Path,  # noqa: ANN001
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A file several read-chunks long (and not a multiple of one) comes down byte for byte."""
    import os

    monkeypatch.setattr(storage, "COPY_CHUNK_BYTES", 64 * 1024)
    local_s3.create_bucket("storage-chunks")
    up = tmp_path / "up"
    up.mkdir()
    payload = os.urandom(5 * 64 * 1024 + 123)
    (up / "model.safetensors").write_bytes(payload)
    (up / "config.json").write_text("{}")
    storage.copy_dir_to(up, "s3://storage-chunks/m", CFG)
    down = storage.copy_dir_from("s3://storage-chunks/m", tmp_path / "down", CFG)
    assert (down / "model.safetensors").read_bytes() == payload
    assert (down / "config.json").read_text() == "{}"
