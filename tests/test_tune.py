"""Tune on a real local Ray: refusals before any trial, failed trials on the leaderboard, resume after a kill."""

from __future__ import annotations

import math
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ray_qlora import storage
from ray_qlora.config import ConfigError, parse_config
from ray_qlora.data.sample import SYSTEM_PROMPT
from ray_qlora.demo import upload_sample
from ray_qlora.pipeline import Run, run_stage

pytestmark = pytest.mark.integration


def _cfg(root: Path, model: Path, **sections: Any):  # noqa: ANN202
    base: dict[str, Any] = {
        "run": {"output_uri": str(root / "out"), "run_id": "t", "seed": 3},
        "data": {"input_uris": [str(root / "raw")], "system_prompt": SYSTEM_PROMPT, "max_seq_length": 128,
                 "cache": True},
        "model": {"base": str(model)},
        "lora": {"r": 4, "alpha": 8},
        "training": {"max_steps": 4, "eval_steps": 2, "batch_size": 4, "logging_steps": 1},
        "tune": {"max_concurrent_trials": 2, "asha": {"enabled": False}},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return parse_config(base)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, ray_local: None) -> Path:
    """Sample data prepared once (later runs of the same data reuse it through the cache)."""
    root = tmp_path_factory.mktemp("tune")
    cfg = _cfg(root, tiny_model_dir)
    upload_sample(str(root / "raw"), cfg.storage)
    run_stage(Run(cfg, "t"), "prepare")
    return root


def _prepared_run(root: Path, model: Path, run_id: str, **sections: Any) -> Run:
    run = Run(_cfg(root, model, **sections), run_id)
    run_stage(run, "prepare")  # a cache hit: copies the shards
    return run


def test_a_trial_no_node_can_hold_is_refused_at_once(root: Path, tiny_model_dir: Path) -> None:
    run = _prepared_run(root, tiny_model_dir, "too-big", tune={"cpus_per_trial": 64})
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"needs 64 CPU and 0 GPU on one node, but the largest node has 4 CPU"):
        run_stage(run, "tune")
    assert time.monotonic() - started < 30
    assert not Path(run.paths.root, "trials").exists(), "no trial may start"


def test_a_trial_that_cannot_fit_in_memory_is_refused_with_the_plan(root: Path, tiny_model_dir: Path) -> None:
    run = _prepared_run(root, tiny_model_dir, "no-fit", tune={"search_space": {"lora.r": {"values": [4, 8]}}})
    run.cfg = run.cfg.with_overrides({"data.max_seq_length": 4_000_000, "training.batch_size": 64})
    run.allow_config_change = True  # the data was prepared at 128 tokens; only the plan is under test
    with pytest.raises(ConfigError, match=r"largest trial of the search space does not fit .* GiB estimated"):
        run_stage(run, "tune")
    assert not Path(run.paths.root, "trials").exists()


def test_lora_targets_the_base_lacks_are_refused_before_any_trial(root: Path, tiny_model_dir: Path) -> None:
    # peft alone would train q_proj and skip the misspelt v_prj without a word
    run = _prepared_run(root, tiny_model_dir, "typo", tune={
        "search_space": {"lora.target_modules": {"values": ["q_proj,v_proj", "q_proj,v_prj"]}}})
    with pytest.raises(ConfigError, match=r"tune\.search_space\.lora\.target_modules \('q_proj,v_prj'\): v_prj is "
                                          r"not a module of .*; its linear layers are down_proj, gate_proj, k_proj"):
        run_stage(run, "tune")
    assert not Path(run.paths.root, "trials").exists()


def test_failed_trial_is_on_the_leaderboard_and_the_search_goes_on(root: Path, tiny_model_dir: Path) -> None:
    run = _prepared_run(root, tiny_model_dir, "mixed", tune={
        # input_layernorm exists (so the preflight lets it through) but peft cannot adapt a norm layer
        "search_space": {"lora.target_modules": {"values": ["q_proj,v_proj", "input_layernorm"]},
                         "lora.r": {"randint": [2, 6]}},
        "max_failures": 0, "mlflow": {"enabled": True, "tracking_uri": f"sqlite:///{root}/mlflow.db",
                                      "experiment": "mixed"}})
    started = time.time()
    result = run_stage(run, "tune")
    board = storage.read_json(result["leaderboard_uri"], run.cfg.storage)
    assert [row["status"] for row in board] == ["completed", "error"]  # best first, the failure last
    ok, failed = board
    assert ok["params"]["lora.target_modules"] == "q_proj,v_proj" and 2 <= ok["params"]["lora.r"] <= 6
    assert failed["params"]["lora.target_modules"] == "input_layernorm"
    assert "LlamaRMSNorm" in failed["error"] and "is not supported" in failed["error"]  # peft's own message
    assert result["failed_trials"] == 1 and result["best_params"] == ok["params"]
    assert ok["tokens_per_s"] > 0 and ok["peak_memory_gib"] > 0 and ok["wall_s"] > 0
    # 2 of Ray's 4 CPUs held by the trials at most: each ran threads on its share of the rest
    assert ok["cpu_threads"] >= 2
    # What the trial chose and why reaches the output Ray forwards to the driver (the trials' worker logs).
    told = "".join(_worker_output_since(started))
    assert "INFO ray_qlora.train: train: liger kernels off: needs a GPU" in told
    assert re.search(r"ray_qlora\.train: train: [2-4] torch threads from step 0 \(1 reserved, [1-3] of 4 CPUs free", told)
    csv = Path(run.paths.root, "tune", "leaderboard.csv").read_text().splitlines()
    assert csv[0].startswith("rank,trial,status,lora.r,lora.target_modules,eval_loss")
    assert len(csv) == 3 and ",error," in csv[2]
    from mlflow.tracking import MlflowClient  # every trial is an MLflow run, with its params and curve

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("mixed").experiment_id])
    assert len(runs) == 2
    (logged,) = [r for r in runs if r.data.params.get("lora.target_modules") == "q_proj,v_proj"]
    assert logged.data.metrics["eval_loss"] == pytest.approx(ok["curve"]["eval_loss"][-1])


def _worker_output_since(t: float) -> list[str]:
    """stdout and stderr of the local Ray's worker processes written since ``t`` (Ray forwards them to the
    driver's output)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return [f.read_text(errors="replace") for f in logs.glob("worker-*") if f.stat().st_mtime >= t]


def test_synchronous_halving_judges_every_trial_at_each_rung(root: Path, tiny_model_dir: Path) -> None:
    # 4 trials of 4 reports, rungs at reports 1 and 2 (steps 2 and 4), keep the best half at each.
    lrs = [1e-4, 1e-3, 1e-2, 5e-2]
    run = _prepared_run(root, tiny_model_dir, "sha", training={"max_steps": 8, "eval_steps": 2}, tune={
        "search_space": {"learning_rate": {"values": lrs}}, "max_concurrent_trials": 2, "borrow_idle_cpus": False,
        "asha": {"enabled": True, "synchronous": True, "grace_period": 1, "reduction_factor": 2}})
    result = run_stage(run, "tune")
    board = storage.read_json(result["leaderboard_uri"], run.cfg.storage)
    loss = {row["params"]["learning_rate"]: dict(zip(row["curve"]["step"], row["curve"]["eval_loss"]))
            for row in board}
    last = {row["params"]["learning_rate"]: row["last_step"] for row in board}
    assert sorted(last.values()) == [2, 2, 4, 8]
    assert {row["cpu_threads"] for row in board} == {1}  # borrowing off: each trial keeps to its own CPU
    # Judged against the whole cohort: the two stopped at step 2 had the two worst losses there.
    at_2 = sorted(lrs, key=lambda lr: loss[lr][2])
    assert {last[lr] for lr in at_2[2:]} == {2} and {last[lr] for lr in at_2[:2]} == {4, 8}
    at_4 = sorted(at_2[:2], key=lambda lr: loss[lr][4])
    assert last[at_4[0]] == 8 and last[at_4[1]] == 4
    status = {row["params"]["learning_rate"]: row["status"] for row in board}
    assert status[at_4[0]] == "completed"
    assert {status[lr] for lr in lrs if lr != at_4[0]} == {"stopped early by SHA"}
    # A trial that waited at a rung resumed from its checkpoint there: no step trained twice.
    resumed = [row for row in board if row["resumed_from_step"] > 0]
    assert resumed and all(row["curve"]["step"] == list(range(2, row["last_step"] + 1, 2)) for row in resumed)
    assert {row["resumed_from_step"] for row in resumed} <= {2, 4}
    # Paused trials hold no slot, and never more than max_concurrent_trials train at once.
    spans = _training_spans(Path(run.paths.root, "trials"))
    assert len(spans) >= 4 + len(resumed)
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) <= 2


def _training_spans(trials: Path) -> list[tuple[float, float]]:
    """(start, last report) of every worker process that trained a trial, from the trials' own reports."""
    import json

    spans: dict[tuple[str, float], float] = {}
    for result in trials.glob("*/result.json"):
        for line in result.read_text().splitlines():
            r = json.loads(line)
            key = (result.parent.name, r["started_at"])
            spans[key] = max(spans.get(key, 0.0), r["reported_at"])
    return [(start, end) for (_, start), end in spans.items()]


def test_optuna_searches_the_space(root: Path, tiny_model_dir: Path) -> None:
    run = _prepared_run(root, tiny_model_dir, "optuna", tune={
        "search_space": {"learning_rate": {"loguniform": [1e-4, 1e-2]}, "lora_r": {"choice": [2, 4]}},
        "search_algorithm": "optuna", "num_samples": 3})
    gauges = _TrialGauges("optuna")
    gauges.start()
    result = run_stage(run, "tune")
    board = storage.read_json(result["leaderboard_uri"], run.cfg.storage)
    assert len(board) == 3 and all(row["status"] == "completed" for row in board)
    lrs = {row["params"]["learning_rate"] for row in board}
    assert len(lrs) == 3 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    # each trial set its Prometheus gauges at its evaluations, tagged with the run id and Tune's trial name
    gauges.wait_for([row["trial"] for row in board], "ray_qlora_trial_eval_loss")
    for row in board:
        exported = gauges.of(row["trial"])
        losses, steps = exported.get("ray_qlora_trial_eval_loss"), exported.get("ray_qlora_trial_step", set())
        assert losses and all(math.isfinite(v) for v in losses), (row["trial"], gauges.seen)
        assert all(any(v == pytest.approx(x, rel=1e-5) for x in row["curve"]["eval_loss"]) for v in losses)
        assert steps <= set(row["curve"]["step"]), (steps, row["curve"]["step"])
        assert all(v > 0 for v in exported.get("ray_qlora_trial_peak_memory_gib", ()))


class _TrialGauges(threading.Thread):
    """The ``ray_qlora_trial_*`` values of one run, scraped from this node's Prometheus exporter every second.

    Scraped while the search runs: a finished trial's worker exits and its series leave the exporter
    soon after. ``seen[trial name][metric]`` holds every value exported (Ray exports every few seconds).
    """

    SAMPLE = re.compile(r'^(ray_qlora_trial_\w+)\{(.*)\} (\S+)$')

    def __init__(self, run_id: str, lifetime: float = 900) -> None:
        import ray

        super().__init__(daemon=True)
        self.run_id, self.seen = run_id, {}
        self.url = f"http://127.0.0.1:{ray._private.worker.global_worker.node.metrics_export_port}/metrics"
        self.done, self.until = threading.Event(), time.monotonic() + lifetime  # stops on its own if a test fails

    def run(self) -> None:
        import urllib.request

        while not self.done.is_set() and time.monotonic() < self.until:
            try:
                text = urllib.request.urlopen(self.url, timeout=10).read().decode()
            except OSError:
                text = ""
            for m in filter(None, map(self.SAMPLE.match, text.splitlines())):
                labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2)))
                if labels.get("run") == self.run_id and labels.get("trial"):
                    self.seen.setdefault(labels["trial"], {}).setdefault(m.group(1), set()).add(float(m.group(3)))
            self.done.wait(1)

    def of(self, folder: str) -> dict[str, set[float]]:
        """What a trial (by its folder: the trial's name, then its params) exported."""
        names = [t for t in list(self.seen) if folder.startswith(t + "_")]
        return self.seen[names[0]] if len(names) == 1 else {}

    def wait_for(self, folders: list[str], metric: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not all(metric in self.of(f) for f in folders) and time.monotonic() < deadline:
            time.sleep(1)
        self.done.set()
        self.join()


def _trial_pids() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any("ImplicitFunc" in part or "train_trial" in part for part in (p.info["cmdline"] or []))]


def test_killed_trial_resumes_from_its_checkpoint(root: Path, tiny_model_dir: Path) -> None:
    run = _prepared_run(root, tiny_model_dir, "killed", training={"max_steps": 40, "eval_steps": 10},
                        tune={"max_failures": 2})
    trials = Path(run.paths.root, "trials")
    outcome: dict[str, Any] = {}

    def search() -> None:
        try:
            outcome["result"] = run_stage(run, "tune")
        except BaseException as err:  # surfaced by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=search)
    thread.start()
    deadline = time.monotonic() + 300
    # kill once the second checkpoint is on disk: a checkpoint folder appears before Tune has registered it,
    # and Tune only lets the trial train on (towards the next one) once it has, so the first is then known
    while not any(trials.glob("*/checkpoint_00000[1-9]")) and time.monotonic() < deadline:
        time.sleep(0.2)
    pids = _trial_pids()
    assert pids, "the trial's worker process was not found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    (row,) = storage.read_json(outcome["result"]["leaderboard_uri"], run.cfg.storage)
    assert row["status"] == "completed" and row["last_step"] == 40
    assert row["resumed_from_step"] >= 10, "the retried trial must start from its checkpoint, not from step 0"
    assert row["curve"]["step"] == list(range(10, 41, 10)), "every report before the kill is on its curve"


def test_resume_without_an_interrupted_search_says_so(root: Path, tiny_model_dir: Path) -> None:
    from ray_qlora.errors import StageOrderError

    run = _prepared_run(root, tiny_model_dir, "never-started")
    run.resume = True
    with pytest.raises(StageOrderError, match="no interrupted search.*without --resume"):
        run_stage(run, "tune")


def _kill_tree(proc: Any) -> None:
    """SIGKILL a driver and everything it started (its local Ray included): a crashed machine, as Tune sees it."""
    import psutil

    parent = psutil.Process(proc.pid)
    for p in [parent, *parent.children(recursive=True)]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def _state_has_checkpoint(trials: Path) -> bool:
    return any("checkpoint_0000" in f.read_text(errors="replace") for f in trials.glob("experiment_state-*.json"))


@pytest.mark.parametrize("synchronous", [False, True], ids=["fifo", "sync-halving"])
def test_tune_resume_finishes_a_search_whose_driver_was_killed(root: Path, tiny_model_dir: Path,
                                                              synchronous: bool) -> None:
    import subprocess
    import sys

    import yaml

    run_id = "resumed-sync" if synchronous else "resumed"
    # 40 steps: the driver is killed near step 10 (about 45 s in here), long before the end
    run = _prepared_run(root, tiny_model_dir, run_id,
                        training={"max_steps": 40, "eval_steps": 10, "eval_max_examples": 8},
                        tune={"search_space": {"learning_rate": {"values": [1e-3, 1e-2]}},
                              "asha": {"enabled": synchronous, "synchronous": synchronous}})
    cfg_file = root / f"{run_id}.yaml"
    cfg_file.write_text(yaml.safe_dump(run.cfg.model_dump(mode="json")))
    cli = [sys.executable, "-m", "ray_qlora.cli", "tune", str(cfg_file), "--run-id", run_id]
    trials = Path(run.paths.root, "trials")
    first = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    # wait until the driver's saved search state knows a checkpoint: what a restore can resume from
    while not _state_has_checkpoint(trials) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, "the search finished before it could be interrupted"
    _kill_tree(first)
    started = sorted(p.name for p in trials.iterdir() if p.is_dir() and p.name.startswith("train_trial"))
    assert len(started) == 2

    done = subprocess.run([*cli, "--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    board = storage.read_json(str(Path(run.paths.root, "tune", "leaderboard.json")), run.cfg.storage)
    assert sorted(row["trial"] for row in board) == started, "the same trials, not new ones"
    if synchronous:  # halving may have stopped one at its first rung before the kill; the rest run on
        assert any(row["status"] == "completed" and row["last_step"] == 40 for row in board)
    else:
        assert all(row["status"] == "completed" and row["last_step"] == 40 for row in board)
    assert max(row["resumed_from_step"] for row in board) >= 10, "restored trials continue from their checkpoints"


def test_a_retried_trials_steps_are_counted_once_with_the_retrys_report() -> None:
    from types import SimpleNamespace

    import pandas as pd

    from ray_qlora.tune import _max_reports, _reports

    # killed after reporting step 20 but before its checkpoint: retried from step 10, it reports 20 again
    df = pd.DataFrame({"step": [10, 20, 20, 30], "eval_loss": [1.0, 0.9, 0.8, 0.7]})
    result = SimpleNamespace(metrics_dataframe=df)
    kept = _reports(result)
    assert list(kept["step"]) == [10, 20, 30] and list(kept["eval_loss"]) == [1.0, 0.8, 0.7]
    assert _max_reports([result, SimpleNamespace(metrics_dataframe=None)]) == 3
