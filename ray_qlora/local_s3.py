"""The embedded object store: moto's S3 server on 127.0.0.1, for the demo and tests.

It speaks the real S3 HTTP API, so everything else runs unchanged against it
(pyarrow's S3FileSystem, boto3, Ray Data) with only an endpoint override.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

__all__ = ["LocalS3", "free_port", "free_ports", "local_s3_in_env", "start_local_s3", "use_local_s3"]


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int, *, with_next: bool = False) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now.

    The sockets stay bound until all are chosen: one closed before the next
    bind lets the OS hand the same port out twice (CI once gave a Ray head the
    same port for its dashboard and its agent). ``with_next`` also holds each
    port's successor, for a caller that uses port+1 too.
    """
    held: list[socket.socket] = []
    chosen: list[int] = []
    try:
        while len(chosen) < count:
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            if with_next:
                nxt = socket.socket()
                held.append(nxt)
                try:
                    nxt.bind(("127.0.0.1", port + 1))
                except (OSError, OverflowError):  # successor taken, or past 65535
                    continue  # this port stays held until the end, so it is not drawn again
            chosen.append(port)
        return chosen
    finally:
        for s in held:
            s.close()


@dataclass
class LocalS3:
    endpoint_url: str
    process: subprocess.Popen[bytes]

    def env(self) -> dict[str, str]:
        """What a process needs to reach this store (keys are moto's dummies, not secrets)."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def create_bucket(self, name: str) -> None:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        if name not in existing:
            s3.create_bucket(Bucket=name)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_local_s3(port: int | None = None, timeout: float = 30.0) -> LocalS3:
    """Start moto's server and wait until it answers HTTP."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the local S3 server exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return LocalS3(url, proc)
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"the local S3 server did not answer at {url} within {timeout}s")


def use_local_s3(store: LocalS3) -> None:
    """Point this process (and the Ray workers it starts) at the store."""
    os.environ.update(store.env())


@contextmanager
def local_s3_in_env() -> Iterator[LocalS3]:
    """A store that this process points at while the block runs.

    Afterwards the server is stopped and the AWS_* variables are what they were,
    so a caller's own store (a test session's, say) is found again rather than
    the dead port of this one.
    """
    store = start_local_s3()
    saved = {k: os.environ.get(k) for k in store.env()}
    try:
        use_local_s3(store)
        yield store
    finally:
        store.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
