"""`ray-qlora demo`, the README's first command, run as a user runs it: the CLI in its own process.

The shipped demo config, shrunk with --set to the tiny model and a few steps so that the whole path
(its own local S3 and Ray, the sample upload, every stage, the question through the `openai` SDK, the
local copy of the report) runs in CI; `make demo` runs the same code at full size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_qlora.local_s3 import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "jobs" / "configs" / "demo.yaml"


def _demo(cwd: Path, *args: str, timeout: int) -> subprocess.CompletedProcess[str]:
    # the demo starts its own store and Ray: nothing of the test session's may leak into its environment
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    return subprocess.run([sys.executable, "-m", "ray_qlora.cli", "demo", str(DEMO_CONFIG), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_demo_runs_end_to_end_with_set_overrides(tiny_model_dir: Path, tmp_path: Path) -> None:
    overrides = {"model.base": str(tiny_model_dir), "training.max_steps": "2", "training.eval_steps": "1",
                 "merge.dtype": "float32", "merge.verify_prompts": "2", "eval.max_examples": "4",
                 "eval.max_new_tokens": "8", "serve.port": str(free_port())}
    proc = _demo(tmp_path, *(a for k, v in overrides.items() for a in ("--set", f"{k}={v}")), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "=== base vs tuned on 4 held-out examples" in out and "exact_match" in out
    assert "\nassistant: " in out  # the served model answered the SDK's request
    kept = tmp_path / ".demo" / "demo"
    resolved = json.loads((kept / "run.json").read_text())["config"]
    assert resolved["model"]["base"] == str(tiny_model_dir)  # the run was built from the overridden config
    assert (resolved["training"]["max_steps"], resolved["serve"]["port"]) == (2, int(overrides["serve.port"]))
    board = json.loads((kept / "tune" / "leaderboard.json").read_text())
    assert {row["params"]["learning_rate"] for row in board} == {2e-3, 4e-3}  # the shipped search space
    # the demo's synchronous halving judges both trials at the first report and keeps one, whatever
    # the order they reach it
    assert sorted(row["status"] for row in board) == ["completed", "stopped early by SHA"]
    assert sorted(row.get("last_step", 0) for row in board) == [1, 2]
    assert (kept / "eval" / "report.json").is_file() and (kept / "tune" / "eval_loss.png").is_file()


def test_demo_names_a_bad_override_and_exits_2(tmp_path: Path) -> None:
    proc = _demo(tmp_path, "--set", "training.max_stepz=2", timeout=120)
    assert proc.returncode == 2
    assert "training.max_stepz" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / ".demo").exists()  # nothing ran
