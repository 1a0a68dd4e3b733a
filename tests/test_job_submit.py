"""`ray job submit` to a `ray start --head` cluster with token authentication on.

The test starts a real head node (as Ray 2.60 starts one, auth on), shows
that a client without the token is refused, submits the pipeline as a job
with the token, and checks the run it leaves behind: run.json in the object
store and a Serve endpoint that outlives the job's driver.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import yaml

from ray_qlora import storage
from ray_qlora.config import load_config
from ray_qlora.demo import upload_sample
from ray_qlora.local_s3 import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def head(local_s3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:  # noqa: ANN001
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # The job's `python` must be this environment's, as on a cluster image with the package installed.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    temp = tmp_path_factory.mktemp("ray-head")
    gcs, dash = free_port(), free_port()
    subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "4",
                    "--temp-dir", str(temp), "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 60
    while time.time() < deadline:  # the jobs API comes up a little after `ray start` returns
        r = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True, timeout=60)
        if r.returncode == 0:
            break
        time.sleep(2)
    yield {"address": address, "env": env}
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def _job_config(tmp: Path, tiny_model_dir: Path, port: int) -> Path:
    cfg = {
        "run": {"output_uri": "s3://job-bucket/out", "run_id": "job"},
        "storage": {"endpoint_url": "${AWS_ENDPOINT_URL}"},
        "data": {"input_uris": ["s3://job-bucket/raw/"], "max_seq_length": 128},
        "model": {"base": str(tiny_model_dir)},
        "lora": {"r": 4, "alpha": 8},
        "training": {"max_steps": 2, "eval_steps": 1, "batch_size": 4},
        "tune": {"search_space": {"lora_r": {"values": [2, 4]}}, "max_concurrent_trials": 2},
        "merge": {"dtype": "float32", "verify_prompts": 2, "verify_max_new_tokens": 4},
        "eval": {"max_examples": 2, "max_new_tokens": 4},
        "serve": {"port": port, "model_name": "job-model", "max_new_tokens": 8,
                  "api_key_file": str(tmp / "keys.txt")},  # auth stays on: the key file is what a Secret mounts
    }
    (tmp / "keys.txt").write_text("job-key-1\n")
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_refused_without_token(head: dict) -> None:
    # a client that sends no token at all: the cluster (not the client) must refuse it
    env = {k: v for k, v in head["env"].items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
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


def test_pipeline_as_a_job(head: dict, local_s3, tiny_model_dir: Path, tmp_path: Path) -> None:  # noqa: ANN001
    local_s3.create_bucket("job-bucket")
    port = free_port()
    cfg_path = _job_config(tmp_path, tiny_model_dir, port)
    cfg = load_config(cfg_path)
    upload_sample("s3://job-bucket/raw", cfg.storage)

    submit = [RAY, "job", "submit", "--address", head["address"], "--working-dir", str(ROOT),
              "--runtime-env", str(ROOT / "jobs" / "runtime_env.yaml"), "--",
              "python", "-m", "ray_qlora.cli", "run", str(cfg_path), "--no-wait"]
    for _ in range(30):  # the job agent may come up after the jobs API answers
        r = subprocess.run(submit, env=head["env"], capture_output=True, text=True, timeout=900, cwd=ROOT)
        if "No available agent" not in r.stderr:
            break
        time.sleep(2)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "succeeded" in r.stdout

    rec = storage.read_json(storage.RunPaths.for_run("s3://job-bucket/out", "job").run_json, cfg.storage)
    assert all(rec["stages"][s]["status"] == "succeeded" for s in ("prepare", "tune", "merge", "evaluate", "serve"))
    assert rec["stages"]["tune"]["result"]["trials"] == 2

    # Serve runs in the cluster, so the endpoint is still up after the job's driver exited.
    url, body = f"http://127.0.0.1:{port}/v1/chat/completions", {
        "model": "job-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    refused = httpx.post(url, timeout=60, json=body)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    resp = httpx.post(url, timeout=60, json=body, headers={"Authorization": "Bearer job-key-1"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["role"] == "assistant"
