"""Stages in order, each handing the next a URI; run.json records it all.

``run.json`` in the run folder holds the resolved config, and per stage its
status, timing, outputs and metrics. A stage run on its own (``ray-qlora
merge``) reads what it needs (e.g. the best adapter URI) from there, so the
CLI verbs and ``run`` share one path through the code.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any, Callable

from ray_qlora import storage
from ray_qlora.config import PipelineConfig
from ray_qlora.errors import StageOrderError

__all__ = ["STAGES", "Run", "connect_ray", "run_pipeline", "run_stage"]

log = logging.getLogger(__name__)

STAGES = ("prepare", "tune", "merge", "evaluate", "serve")


def connect_ray(cfg: PipelineConfig) -> None:
    """Join the configured cluster, the one a `ray job submit` driver runs in, or start a local Ray."""
    import os

    import ray

    if ray.is_initialized():
        return
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        # A job's runtime env (jobs/runtime_env.yaml) already applies; passing
        # another here would replace it, working_dir included.
        ray.init(address=cfg.ray.address, log_to_driver=True)
    else:
        # Local workers inherit this process's environment (S3 settings included).
        # address="local": a fresh local Ray, never a stale record of an earlier cluster.
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    log.info("ray: %s", ray.cluster_resources())


class Run:
    """A run folder and its run.json."""

    def __init__(self, cfg: PipelineConfig, run_id: str | None = None, resume: bool = False) -> None:
        self.cfg = cfg
        self.resume = resume  # tune: finish an interrupted search instead of starting one
        self.run_id = run_id or cfg.run.run_id or dt.datetime.now(dt.timezone.utc).strftime("run-%Y%m%d-%H%M%S")
        self.paths = storage.RunPaths.for_run(cfg.run.output_uri, self.run_id)

    def record(self) -> dict[str, Any]:
        if storage.exists(self.paths.run_json, self.cfg.storage):
            return storage.read_json(self.paths.run_json, self.cfg.storage)
        return {"run_id": self.run_id, "root": self.paths.root, "stages": {}}

    def save_stage(self, stage: str, entry: dict[str, Any]) -> None:
        rec = self.record()
        rec["config"] = self.cfg.model_dump(mode="json")
        rec["stages"][stage] = entry
        storage.write_json(self.paths.run_json, rec, self.cfg.storage)

    def output(self, stage: str) -> dict[str, Any]:
        """A finished stage's result, or an error saying which verb to run first."""
        entry = self.record()["stages"].get(stage)
        if not entry or entry.get("status") != "succeeded":
            raise StageOrderError(f"run {self.run_id}: stage '{stage}' has not succeeded yet; "
                               f"run `ray-qlora {stage}` for this run first")
        return entry["result"]


def _stage_fns(run: Run) -> dict[str, Callable[[], dict[str, Any]]]:
    cfg, paths = run.cfg, run.paths

    def _prepare() -> dict[str, Any]:
        from ray_qlora.prepare import prepare
        return prepare(cfg, paths)

    def _tune() -> dict[str, Any]:
        from ray_qlora.tune import tune
        run.output("prepare")  # trials need the prepared shards: say so before starting any
        return tune(cfg, paths, resume=run.resume)

    def _merge() -> dict[str, Any]:
        from ray_qlora.merge import merge
        return merge(cfg, paths, run.output("tune")["best_adapter_uri"])

    def _evaluate() -> dict[str, Any]:
        from ray_qlora.evaluate import evaluate
        run.output("merge")
        return evaluate(cfg, paths)

    def _serve() -> dict[str, Any]:
        from ray_qlora.serve import deploy
        run.output("merge")
        return deploy(cfg, paths, run.run_id)

    return {"prepare": _prepare, "tune": _tune, "merge": _merge, "evaluate": _evaluate, "serve": _serve}


def run_stage(run: Run, stage: str) -> dict[str, Any]:
    """Run one stage on a connected Ray and record its outcome in run.json."""
    started = time.time()
    n = STAGES.index(stage) + 1
    log.info("==> [%d/%d] %s  (run %s)", n, len(STAGES), stage, run.paths.root)
    print(f"==> [{n}/{len(STAGES)}] {stage}", flush=True)
    try:
        result = _stage_fns(run)[stage]()
    except BaseException as err:
        run.save_stage(stage, {"status": "failed", "error": f"{type(err).__name__}: {err}",
                               "started": started, "seconds": round(time.time() - started, 1)})
        raise
    run.save_stage(stage, {"status": "succeeded", "result": result, "started": started,
                           "seconds": round(time.time() - started, 1)})
    print(f"    {stage} done in {time.time() - started:.0f}s", flush=True)
    return result


def run_pipeline(cfg: PipelineConfig, stages: tuple[str, ...] = STAGES, run_id: str | None = None) -> Run:
    """Every stage in order on one run folder."""
    connect_ray(cfg)
    run = Run(cfg, run_id)
    for stage in stages:
        run_stage(run, stage)
    return run
