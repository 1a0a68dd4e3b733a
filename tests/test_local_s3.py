"""The embedded store's context manager: the process uses it inside the block, and what it had before after."""

from __future__ import annotations

import os

import pytest

from ray_qlora.local_s3 import local_s3_in_env


def test_local_s3_in_env_points_the_process_at_it_and_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # a caller's own endpoint
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    with pytest.raises(RuntimeError, match="inside"):
        with local_s3_in_env() as store:
            assert os.environ["AWS_ENDPOINT_URL"] == store.endpoint_url
            store.create_bucket("in-env")
            # a client built from the environment alone reaches this store
            assert "in-env" in {b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]}
            raise RuntimeError("inside")  # the block fails: the process must still get its settings back
    assert store.process.poll() is not None, "the server outlived the block"
    assert os.environ["AWS_ENDPOINT_URL"] == "http://127.0.0.1:1"
    assert "AWS_DEFAULT_REGION" not in os.environ
