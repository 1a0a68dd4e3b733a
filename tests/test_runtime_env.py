"""jobs/runtime_env.py: the variables a submitted job gets are the ones its config's values use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "jobs" / "runtime_env.py"

CONFIG = """\
run:
  output_uri: ${OUT}/runs   # or ${NEVER_SET_IN_A_COMMENT}
# model: {base: ${NEVER_SET_IN_A_COMMENT}}
storage:
  endpoint_url: ${EP:-}
data:
  input_uris: ["${IN:-s3://b/raw/}"]
"""


def _run(config: Path, *names: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # from another folder, as a script: how the README and cluster/local-cluster.sh call it
    return subprocess.run([sys.executable, str(SCRIPT), str(config), *names], cwd=config.parent, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(CONFIG)
    return path


def _clean_env(**extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith("RAY_QLORA_") and k not in ("OUT", "EP", "IN", "NEVER_SET_IN_A_COMMENT")}
    return {**keep, **extra}


def test_passes_what_the_values_use_and_nothing_from_comments(config: Path) -> None:
    r = _run(config, "AWS_REGION", env=_clean_env(OUT="s3://bucket", IN="s3://b/in/", AWS_REGION="eu-west-1",
                                                 RAY_QLORA_API_KEYS="k1", UNRELATED="x"))
    assert r.returncode == 0, r.stderr
    env = json.loads(r.stdout)
    assert env["env_vars"] == {"TOKENIZERS_PARALLELISM": "false", "OUT": "s3://bucket", "IN": "s3://b/in/",
                               "AWS_REGION": "eu-west-1", "RAY_QLORA_API_KEYS": "k1"}
    assert env["excludes"][:2] == [".venv/", ".git/"]  # the file's own settings are kept


def test_a_needed_variable_that_is_unset_is_an_error_before_submitting(config: Path) -> None:
    r = _run(config, "AWS_REGION", env=_clean_env())
    assert r.returncode != 0 and not r.stdout
    # OUT has no default and AWS_REGION was asked for; EP and IN have defaults, the comment does not count
    assert r.stderr.strip().startswith("error: set AWS_REGION, OUT in this shell first"), r.stderr
    assert "NEVER_SET" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("text", [None, "run: [unclosed\n"], ids=["missing", "bad-yaml"])
def test_an_unreadable_config_is_one_line(text: str | None, tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    if text is not None:
        path.write_text(text)
    r = _run(path, env=_clean_env())
    assert r.returncode != 0 and r.stderr.startswith(f"error: cannot read the config {path}"), r.stderr
    assert "Traceback" not in r.stderr
