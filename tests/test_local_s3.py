"""The embedded store's context manager (the process uses it inside the block, and what it had before after),
and the free ports the tests and the demo start servers on."""

from __future__ import annotations

import os
import socket

import pytest

from ray_qlora.local_s3 import free_ports, local_s3_in_env


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_free_ports_are_distinct_and_free() -> None:
    ports = free_ports(500)
    assert len(set(ports)) == 500, "a port handed out twice: two servers would fight over it"
    assert all(_bindable(p) for p in ports)


def test_free_ports_with_next_leave_each_successor_free_and_unchosen() -> None:
    ports = free_ports(50, with_next=True)
    assert len(set(ports)) == 50
    assert not {p + 1 for p in ports} & set(ports), "a port's successor was handed out as another port"
    assert all(_bindable(p) and _bindable(p + 1) for p in ports)


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
