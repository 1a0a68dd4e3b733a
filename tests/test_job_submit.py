"""`ray job submit` to cluster/local-cluster.sh's cluster (head + 1 worker, token auth on), as the README says.

The module starts the cluster with the script (free ports, a temp dir of its
own, nodes that do not see this shell's S3 or RAY_QLORA_* variables), shows
that a client without the token is refused, runs the README's upload and
`ray job submit` lines (only the port and the model changed), checks the
run the job leaves in the object store and asks the Serve endpoint, which
outlives the job's driver; then `down` must leave no process behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx
import psutil
import pytest

from ray_qlora import storage
from ray_qlora.config import load_config
from ray_qlora.local_s3 import free_port, free_ports

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
SCRIPT = str(ROOT / "cluster" / "local-cluster.sh")


def _readme_commands() -> dict[str, str]:
    """The README's local-cluster block, one command per first word (continuation lines joined)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("### A multi-node cluster on one machine", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    cmds: dict[str, str] = {}
    for cmd in re.sub(r"\\\n\s*", "", block).splitlines():
        cmd = re.sub(r"\s+#\s.*$", "", cmd).strip()
        if cmd:
            key = " ".join(cmd.split()[:2 if cmd.startswith((".venv/bin/", "cluster/")) else 1])
            cmds[key] = cmd
    return cmds


def _cluster_processes(temp: str) -> list[psutil.Process]:
    """Live processes of the cluster rooted at ``temp``.

    Zombies are left out: they have exited, and an orphan's is reaped by init
    when init gets to it. (CI once found a Ray `python -u` process here alive,
    a zombie a moment later: `down` had returned right after its SIGKILL.)
    """
    return [p for p in psutil.process_iter(["cmdline", "status"])
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(temp in arg for arg in (p.info["cmdline"] or []))]


@pytest.fixture(scope="module")
def cluster(local_s3) -> Iterator[dict]:  # noqa: ANN001
    temp = tempfile.mkdtemp(prefix="rq-job-")  # short: Ray's socket paths must stay under 107 bytes
    # distinct ports, each with its successor free: the worker's agent takes AGENT_PORT+1
    ports = dict(zip(("GCS_PORT", "DASH_PORT", "CLIENT_PORT", "AGENT_PORT"), map(str, free_ports(4, with_next=True))))
    # The nodes start without this shell's S3 and RAY_QLORA_* settings: the job must get them
    # from its runtime env, as on a real cluster.
    node_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("AWS_", "RAY_QLORA_", "RAY_AUTH_", "RAY_ADDRESS"))}
    node_env.update(ports, RAY_TEMP_DIR=temp, VENV=str(BIN.parent), HEAD_CPUS="1", WORKER_CPUS="2",
                    OBJECT_STORE_MB="512")
    started = time.monotonic()
    up = subprocess.run([SCRIPT, "up", "1"], env=node_env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        print(f"local-cluster.sh up 1: {time.monotonic() - started:.0f} s")
        # what `up` prints to export, in the submitting shell
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": f"{temp}/auth_token"}
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_AUTH_TOKEN", None)
        assert f"RAY_AUTH_TOKEN_PATH={temp}/auth_token" in up.stdout, up.stdout
        yield {"address": f"http://127.0.0.1:{ports['DASH_PORT']}", "env": env, "temp": temp, "up": up.stdout}
    finally:
        down = subprocess.run([SCRIPT, "down"], env=node_env, capture_output=True, text=True, timeout=120)
        left = _cluster_processes(temp)
        shutil.rmtree(temp, ignore_errors=True)
        assert down.returncode == 0, down.stderr
        assert not left, [p.info["cmdline"][:2] for p in left]


def test_refused_without_token(cluster: dict) -> None:
    head = cluster
    # a client that sends no token at all: the cluster (not the client) must refuse it
    env = {k: v for k, v in head["env"].items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    env["HOME"] = "/nonexistent"  # no ~/.ray/auth_token to fall back on
    r = subprocess.run([RAY, "job", "list", "--address", head["address"]], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "Unauthorized: Missing authentication token" in r.stderr, r.stderr[-2000:]
    wrong = {**env, "RAY_AUTH_TOKEN": "0" * 64}
    r = subprocess.run([RAY, "job", "list", "--address", head["address"]], env=wrong, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "Unauthorized" in r.stderr, r.stderr[-2000:]
    r = subprocess.run([RAY, "job", "list", "--address", head["address"]], env=head["env"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]  # the same call with the cluster's token goes through


def test_readme_job_on_the_local_cluster(cluster: dict, local_s3, tiny_model_dir: Path) -> None:  # noqa: ANN001
    cmds = _readme_commands()
    port = free_port()
    env = {**cluster["env"], "RAY_QLORA_BASE": str(tiny_model_dir), "RAY_QLORA_API_KEYS": "job-key-1"}

    def sh(cmd: str, timeout: int) -> subprocess.CompletedProcess[str]:
        cmd = cmd.replace(".venv/bin/", f"{BIN}/").replace("127.0.0.1:8265", cluster["address"][len("http://"):])
        return subprocess.run(["bash", "-c", cmd], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)

    upload = sh(cmds[".venv/bin/python jobs/upload_sample.py"], 120)
    assert upload.returncode == 0, upload.stderr[-3000:]
    # the README's submit line; then only what makes it a test: the tiny model's sizes, a free port
    submit = cmds[".venv/bin/ray job"] + " " + " ".join(
        f"--set {kv}" for kv in (
            "run.run_id=job", "data.max_seq_length=128", "data.packing=false", "lora.r=4", "lora.alpha=8",
            "training.max_steps=2", "training.eval_steps=1", "training.batch_size=4", "merge.dtype=float32",
            "merge.verify_prompts=2", "merge.verify_max_new_tokens=4", "eval.max_examples=2",
            "eval.max_new_tokens=4", "serve.max_new_tokens=8", "serve.autoscaling.max_replicas=1",
            f"serve.port={port}"))
    assert submit.split(" -- ")[1].startswith("python -m ray_qlora.cli run jobs/configs/local-cluster.yaml --no-wait")
    started = time.monotonic()
    r = sh(submit, 900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout
    print(f"job: {time.monotonic() - started:.0f} s")
    assert "Intel oneMKL" not in r.stdout and "FinalizeS3" not in r.stdout

    cfg = load_config(ROOT / "jobs" / "configs" / "local-cluster.yaml")
    rec = storage.read_json(storage.RunPaths.for_run(cfg.run.output_uri, "job").run_json, cfg.storage)
    assert all(rec["stages"][s]["status"] == "succeeded" for s in ("prepare", "tune", "merge", "evaluate", "serve"))
    assert rec["stages"]["tune"]["result"]["trials"] == 2
    assert rec["config"]["model"]["base"] == str(tiny_model_dir)  # RAY_QLORA_BASE reached the job

    # Serve runs in the cluster, so the endpoint is still up after the job's driver exited.
    url, body = f"http://127.0.0.1:{port}/v1/chat/completions", {
        "model": "medication-json", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    refused = httpx.post(url, timeout=60, json=body)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    resp = httpx.post(url, timeout=60, json=body, headers={"Authorization": "Bearer job-key-1"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["role"] == "assistant"


# A raylet's stand-in: names the temp dir, shrugs off SIGTERM and keeps starting
# workers (`sleep`s whose argv[0] names the temp dir) until it is killed.
_SUPERVISOR = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
while True:
    subprocess.Popen([sys.argv[1] + "/worker", "600"], executable="sleep")
    time.sleep(0.05)
"""


def test_down_stops_a_supervisor_that_keeps_starting_workers() -> None:
    """`down` returns only when every process of the cluster is gone.

    CI once found a Ray `python -u` process (a log monitor, an agent or a
    worker) still alive right after `down`: `down` returned as soon as it had
    sent SIGKILL, and never looked again for processes started meanwhile.
    """
    temp = tempfile.mkdtemp(prefix="rq-down-")
    env = {**os.environ, "RAY_TEMP_DIR": temp, "VENV": str(BIN.parent)}
    supervisor = subprocess.Popen([sys.executable, "-c", _SUPERVISOR, temp], stdout=subprocess.PIPE, text=True)
    try:
        assert supervisor.stdout is not None and supervisor.stdout.readline().strip() == "ready"
        # the timeout only guards against a hang: on a loaded machine each scan for processes is slow
        r = subprocess.run([SCRIPT, "down"], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and f"cluster under {temp} stopped" in r.stdout, r.stdout + r.stderr
        left = _cluster_processes(temp)
        assert not left, [(p.pid, p.info["cmdline"]) for p in left]
        assert supervisor.wait(timeout=5) == -signal.SIGKILL
    finally:
        for p in _cluster_processes(temp):
            p.kill()
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
        shutil.rmtree(temp, ignore_errors=True)
