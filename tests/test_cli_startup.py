"""How a stage verb starts: a dead cluster address fails fast, and torch is loaded first.

Each case runs the CLI (or a few lines of it) in a fresh process, as a user
or a job's driver would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ray_qlora.local_s3 import free_port

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


@pytest.mark.parametrize("via", ["config", "RAY_ADDRESS"])
def test_unreachable_cluster_fails_within_seconds(via: str, tmp_path: Path) -> None:
    # After a cluster died uncleanly, ray.init retried its GCS for minutes; the CLI
    # must say at once which address it could not reach, with no traceback.
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    cfg = {"run": {"output_uri": str(tmp_path / "out")}, "data": {"input_uris": [str(tmp_path / "raw")]}}
    if via == "config":
        cfg["ray"] = {"address": address}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = _env(**({"RAY_ADDRESS": address} if via == "RAY_ADDRESS" else {}))
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "ray_qlora.cli", "prepare", str(path)], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    assert r.returncode == 2, r.stderr[-3000:]
    assert took < 30, f"took {took:.0f} s"
    source = "ray.address" if via == "config" else "RAY_ADDRESS"
    assert f"cannot reach the Ray cluster at {address} (from {source})" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr


_AFTER_PREPARE = """
import os, sys
{load}
import pyarrow.fs as pafs
pafs.S3FileSystem(endpoint_override="http://127.0.0.1:9", region="us-east-1",
                  access_key="testing", secret_key="testing")  # initialises the AWS SDK, as prepare does
gone = sys.argv[1]
os.chdir(gone)
os.rmdir(gone)  # the job's working_dir goes away under the driver
import torch   # what tune does next
print(float(torch.linalg.inv(torch.eye(4) * 2).sum()))
"""


def test_torch_loaded_first_survives_a_deleted_working_dir(tmp_path: Path) -> None:
    def run(load: str, name: str) -> subprocess.CompletedProcess[str]:
        (tmp_path / name).mkdir()
        return subprocess.run([sys.executable, "-c", _AFTER_PREPARE.format(load=load), str(tmp_path / name)],
                              env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)

    fixed = run("from ray_qlora.cli import _load_torch_first; _load_torch_first()", "fixed")
    assert fixed.returncode == 0 and fixed.stdout.strip() == "2.0", fixed.stderr[-3000:]
    # The report, reproduced: oneMKL's exit, then the AWS SDK's crash at exit.
    before = run("", "before")
    if before.returncode == 0:
        pytest.skip("this torch build does not need its working directory at import")
    assert "Intel oneMKL FATAL ERROR" in before.stderr, before.stderr[-3000:]


def test_a_deleted_working_dir_is_a_user_error(tmp_path: Path) -> None:
    code = ("import os, sys; os.chdir(sys.argv[1]); os.rmdir(sys.argv[1])\n"
            "from ray_qlora.cli import _load_torch_first; from ray_qlora.errors import UserError\n"
            "try:\n    _load_torch_first()\nexcept UserError as e:\n    print(e)")
    (tmp_path / "gone").mkdir()
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "gone")], env=_env(), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "working directory no longer exists" in r.stdout, r.stdout + r.stderr[-3000:]
