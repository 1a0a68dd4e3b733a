"""Stages in order, each handing the next a URI; run.json records it all.

``run.json`` in the run folder holds the config the run started with, and per
stage the config it actually ran with, its status, timing, outputs and
metrics. A stage run on its own (``ray-qlora merge``) reads what it needs
(e.g. the best adapter URI) from there, so the CLI verbs and ``run`` share one
path through the code.

Lineage: a stage refuses to run with a config that differs from what an
earlier stage of the run used in a way that changes its inputs (another base
model, other data, another LoRA shape), naming the keys, unless the user
says so (``--allow-config-change``): merging an adapter onto a base it was
not trained on gives a broken model without any error.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any, Callable

from ray_qlora import storage
from ray_qlora.config import PipelineConfig
from ray_qlora.errors import StageOrderError, UserError

__all__ = ["STAGES", "LineageError", "Run", "config_changes", "connect_ray", "run_pipeline", "run_stage"]

log = logging.getLogger(__name__)

STAGES = ("prepare", "tune", "merge", "evaluate", "serve")

# The config keys (dotted prefixes) a stage's output depends on: later stages
# must not run with other values. Speed knobs (actors, batch sizes, cache) are
# left out: they change how, not what.
OUTPUT_KEYS: dict[str, tuple[str, ...]] = {
    "prepare": ("model.base", "data"),
    "tune": ("model.base", "model.quantization", "lora.r", "lora.alpha", "lora.target_modules"),
}
_SPEED_KEYS = ("data.num_actors", "data.batch_size", "data.cache")


class LineageError(UserError, ValueError):
    """A stage's config contradicts what earlier stages of the run were built with."""


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(before: dict[str, Any], after: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, tuple]:
    """{dotted key: (before, after)} for keys under ``prefixes`` whose values differ."""
    a, b = _flatten(before), _flatten(after)
    keys = sorted(k for k in a.keys() | b.keys()
                  if any(k == p or k.startswith(p + ".") for p in prefixes) and not k.startswith(_SPEED_KEYS))
    return {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}


def connect_ray(cfg: PipelineConfig) -> None:
    """Join the configured cluster, the one a `ray job submit` driver runs in, or start a local Ray.

    A cluster that cannot be reached fails within seconds with its address
    (UserError): ray.init alone retries a dead GCS for minutes.
    """
    import os

    import ray

    if ray.is_initialized():
        return
    address, source = cfg.ray.address, "ray.address"
    if address in (None, "auto") and os.environ.get("RAY_ADDRESS"):  # Ray reads it for these two only
        address, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if address and address != "local":
        _check_reachable(address, source)
        # A job's runtime env (jobs/runtime_env.yaml) already applies; passing
        # another here would replace it, working_dir included.
        try:
            ray.init(address=cfg.ray.address, log_to_driver=True)
        except ConnectionError as err:
            raise UserError(f"cannot join the Ray cluster at {address} (from {source}): {err}") from None
    else:
        # Local workers inherit this process's environment (S3 settings included).
        # address="local": a fresh local Ray, never Ray's record of the last
        # cluster on this machine, which may have died uncleanly.
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    log.info("ray: %s", ray.cluster_resources())


def _check_reachable(address: str, source: str, timeout_s: float = 5.0) -> None:
    """Raise UserError unless something accepts a TCP connection at the cluster's address."""
    import socket

    target = address
    if address == "auto":  # Ray's record of the last `ray start` on this machine (in its temp dir)
        from ray._private.services import find_bootstrap_address

        target = find_bootstrap_address(None) or ""  # none: ray.init looks further, or says so at once
    host, _, port = target.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return  # not host:port; ray.init says what is wrong with it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        shown = address if target == address else f"{address} ({target})"
        raise UserError(
            f"cannot reach the Ray cluster at {shown} (from {source}): {err.strerror or err}. "
            f"Start the cluster or fix {source}; unset it (or set ray.address: local) to run on a local Ray.") from None


class Run:
    """A run folder and its run.json."""

    def __init__(self, cfg: PipelineConfig, run_id: str | None = None, resume: bool = False,
                 allow_config_change: bool = False) -> None:
        self.cfg = cfg
        self.resume = resume  # tune: finish an interrupted search instead of starting one
        self.allow_config_change = allow_config_change
        self.run_id = run_id or cfg.run.run_id or dt.datetime.now(dt.timezone.utc).strftime("run-%Y%m%d-%H%M%S")
        self.paths = storage.RunPaths.for_run(cfg.run.output_uri, self.run_id)

    def record(self) -> dict[str, Any]:
        if storage.exists(self.paths.run_json, self.cfg.storage):
            return storage.read_json(self.paths.run_json, self.cfg.storage)
        return {"run_id": self.run_id, "root": self.paths.root, "stages": {}}

    def save_stage(self, stage: str, entry: dict[str, Any]) -> None:
        """Record a stage's outcome with the config it ran with; the run's own config is the first one."""
        rec = self.record()
        config = self.cfg.model_dump(mode="json")
        rec.setdefault("config", config)
        rec["stages"][stage] = {**entry, "config": config}
        storage.write_json(self.paths.run_json, rec, self.cfg.storage)

    def check_lineage(self, stage: str) -> dict[str, tuple]:
        """Refuse (LineageError) a config that changes what earlier stages' outputs were built from.

        Returns the changes let through by ``allow_config_change`` (recorded with the stage).
        """
        stages = self.record()["stages"]
        now = self.cfg.model_dump(mode="json")
        changes: dict[str, tuple] = {}
        for earlier in STAGES[:STAGES.index(stage)]:
            entry = stages.get(earlier)
            if not entry or entry.get("status") != "succeeded" or "config" not in entry:
                continue
            for key, (was, is_) in config_changes(entry["config"], now, OUTPUT_KEYS.get(earlier, ())).items():
                changes.setdefault(key, (was, is_, earlier))
        if changes and not self.allow_config_change:
            lines = "\n".join(f"  {k}: {was!r} in {by}, now {is_!r}" for k, (was, is_, by) in changes.items())
            raise LineageError(
                f"run {self.run_id}: this config differs from the one its earlier stages ran with:\n{lines}\n"
                f"Restore those values, start a new run (--run-id), or pass --allow-config-change "
                f"if the change is intended")
        if changes:
            log.warning("lineage: %s runs with changed keys %s (allowed)", stage, ", ".join(changes))
        return {k: v[:2] for k, v in changes.items()}

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
        from ray_qlora.adapters import publish_run
        from ray_qlora.tune import tune
        run.output("prepare")  # trials need the prepared shards: say so before starting any
        result = tune(cfg, paths, resume=run.resume)
        if cfg.adapters.publish:
            result["published"] = publish_run(cfg, paths, run.run_id, result)
        return result

    def _merge() -> dict[str, Any]:
        from ray_qlora.merge import merge
        return merge(cfg, paths, run.output("tune")["best_adapter_uri"])

    def _evaluate() -> dict[str, Any]:
        from ray_qlora.evaluate import evaluate
        merged = run.output("merge")
        return evaluate(cfg, paths, merged, merged.get("adapter_uri"))

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
    changes = run.check_lineage(stage)
    extra = {"config_changes": changes} if changes else {}
    try:
        result = _stage_fns(run)[stage]()
    except BaseException as err:
        run.save_stage(stage, {"status": "failed", "error": f"{type(err).__name__}: {err}",
                               "started": started, "seconds": round(time.time() - started, 1), **extra})
        raise
    run.save_stage(stage, {"status": "succeeded", "result": result, "started": started,
                           "seconds": round(time.time() - started, 1), **extra})
    print(f"    {stage} done in {time.time() - started:.0f}s", flush=True)
    return result


def run_pipeline(cfg: PipelineConfig, stages: tuple[str, ...] = STAGES, run_id: str | None = None,
                 allow_config_change: bool = False) -> Run:
    """Every stage in order on one run folder."""
    if "serve" in stages:  # a missing API key is the user's to fix: say so before hours of training, not after
        from ray_qlora.serve.deployment import api_keys

        api_keys(cfg)
    if "evaluate" in stages:  # likewise: a schema xgrammar refuses, or no xgrammar for strict calls, fails now
        from ray_qlora.evaluate import check_generation

        check_generation(cfg)
    connect_ray(cfg)
    run = Run(cfg, run_id, allow_config_change=allow_config_change)
    for stage in stages:
        run_stage(run, stage)
    return run
