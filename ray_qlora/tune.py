"""Stage 2, tune: parallel QLoRA trials with Ray Tune; ASHA stops the weak ones.

Each trial gets ``cpus_per_trial`` CPUs and, where the cluster has GPUs, one
GPU. Trial results and adapter checkpoints live in ``<run>/trials`` in the
run's object storage, so any node (and a later ``merge``) can read them. The
best trial is the one with the lowest eval loss at any reported step.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ray_qlora import storage
from ray_qlora.config import ConfigError, PipelineConfig, SearchDim, tunable_path
from ray_qlora.errors import StageOrderError
from ray_qlora.resources import live_nodes, room

if TYPE_CHECKING:
    from ray.tune import ResultGrid

__all__ = ["preflight", "search_space", "trial_resources", "tune"]

log = logging.getLogger(__name__)


def _dim(d: SearchDim) -> Any:
    from ray import tune as rt

    if d.values is not None:
        return rt.grid_search(d.values)
    if d.choice is not None:
        return rt.choice(d.choice)
    if d.loguniform is not None:
        return rt.loguniform(*d.loguniform)
    if d.randint is not None:
        return rt.randint(d.randint[0], d.randint[1] + 1)  # Tune's upper bound is exclusive, ours inclusive
    return rt.uniform(*d.uniform)  # type: ignore[misc]


def search_space(cfg: PipelineConfig) -> dict[str, Any]:
    """Tune param_space: the sampled keys only (the config travels by tune.with_parameters)."""
    return {name: _dim(d) for name, d in cfg.tune.search_space.items()}


def _searcher(cfg: PipelineConfig) -> Any:
    """None (Tune's grid and random sampling) or Optuna's TPE, limited to the concurrent trials."""
    if cfg.tune.search_algorithm != "optuna":
        return None
    try:
        from ray.tune.search.optuna import OptunaSearch
        import optuna  # noqa: F401  (OptunaSearch imports it lazily; fail here with a clear message)
    except ImportError:
        raise ConfigError("tune.search_algorithm: optuna needs the 'search' extra: pip install 'ray-qlora[search]'") \
            from None
    from ray.tune.search import ConcurrencyLimiter

    return ConcurrencyLimiter(OptunaSearch(seed=cfg.run.seed), max_concurrent=cfg.tune.max_concurrent_trials)


def _largest_values(cfg: PipelineConfig) -> PipelineConfig:
    """The config with each searched key at its most memory-hungry value (largest number or list)."""
    worst: dict[str, Any] = {}
    for key, dim in cfg.tune.search_space.items():
        section, name = tunable_path(key)  # type: ignore[misc]
        if name not in ("r", "batch_size", "target_modules"):
            continue
        values = dim.examples()
        if name == "target_modules":
            worst[f"{section}.{name}"] = "all-linear" if "all-linear" in values else max(
                values, key=lambda v: len(v) if isinstance(v, list) else len(str(v).split(",")))
        elif all(isinstance(v, (int, float)) for v in values):
            worst[f"{section}.{name}"] = int(max(values))
    return cfg.with_overrides(worst) if worst else cfg


def _keep_rows_on_restart() -> Any:
    """A Tune callback that uploads a restarting trial's result files before Tune's loggers fetch them.

    Tune's JSON and CSV loggers reopen a trial that restarts from a checkpoint (paused at a rung, or
    retried after its worker died) by downloading its files from storage, which the driver syncs
    only every few minutes: the rows reported since the last sync were overwritten, and the trial's
    curve (and best loss) lost them. User callbacks run before Tune's default loggers.
    """
    from pathlib import Path

    import pyarrow.fs
    from ray.tune import Callback

    class KeepRowsOnRestart(Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if not trial.checkpoint:
                return  # a fresh start: the loggers download nothing
            for name in ("result.json", "progress.csv"):
                local = Path(trial.local_path, name)
                if local.exists():
                    pyarrow.fs.copy_files(str(local), f"{trial.storage.trial_fs_path}/{name}",
                                          destination_filesystem=trial.storage.storage_filesystem)

    return KeepRowsOnRestart()


def _callbacks(cfg: PipelineConfig, run: storage.RunPaths) -> list[Any]:
    """Result files kept across trial restarts, and experiment tracking: Ray's MLflow logger (one MLflow
    run per trial) when tune.mlflow.enabled."""
    callbacks = [_keep_rows_on_restart()]
    if not cfg.tune.mlflow.enabled:
        return callbacks
    import os

    try:
        from ray.air.integrations.mlflow import MLflowLoggerCallback
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError("tune.mlflow.enabled needs MLflow: pip install 'ray-qlora[tracking]'") from None
    uri = (cfg.tune.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
           or f"sqlite:///{os.path.abspath('mlflow.db')}")
    log.info("tune: logging trials to MLflow at %s, experiment %r", uri, cfg.tune.mlflow.experiment)
    return [*callbacks, MLflowLoggerCallback(tracking_uri=uri, experiment_name=cfg.tune.mlflow.experiment,
                                             tags={"ray_qlora.run": run.root})]


def preflight(cfg: PipelineConfig, resources: dict[str, float]) -> dict[str, Any]:
    """Before any trial: can some node ever hold one, does the base have the LoRA targets, and does the
    memory plan fit? Raises ConfigError."""
    nodes = live_nodes()
    need_cpu, need_gpu = resources["cpu"], resources["gpu"]
    if not cfg.tune.cluster_autoscales and not any(
            room(n, {"CPU": need_cpu, "GPU": need_gpu}) > 0 for n in nodes):
        most_cpu = max((n.get("CPU", 0) for n in nodes), default=0)
        most_gpu = max((n.get("GPU", 0) for n in nodes), default=0)
        raise ConfigError(
            f"tune: a trial needs {need_cpu:g} CPU and {need_gpu:g} GPU on one node, but the largest node has "
            f"{most_cpu:g} CPU and {most_gpu:g} GPU ({len(nodes)} node(s)); lower tune.cpus_per_trial / "
            "tune.gpus_per_trial, add a bigger node, or set tune.cluster_autoscales: true if the cluster "
            "starts such nodes on demand")
    from ray_qlora.modeling import check_lora_targets, resolve_base
    from ray_qlora.plan import GIB, model_shape, plan_trial
    from ray_qlora.train import resolve_speed

    worst = _largest_values(cfg)
    shape = model_shape(worst, None)
    check_lora_targets(cfg, resolve_base(cfg.model, cfg.storage))
    if need_gpu > 0:
        budget = (cfg.tune.gpu_memory_gb * GIB if cfg.tune.gpu_memory_gb else _gpu_memory(need_gpu))
        if budget is None:
            return {"checked": False, "why": "no GPU node answered; memory not planned"}
        resolved, why = resolve_speed(worst, shape, "cuda", gpu_bytes=budget)
        plan = plan_trial(resolved, shape, budget)
    else:
        budget = max((n.get("memory", 0) for n in nodes), default=0) or None
        resolved, why = resolve_speed(worst, shape, "cpu")
        plan = plan_trial(resolved, shape, budget, on_gpu=False)
    log.info("tune: memory plan for the largest trial of the space:\n%s", plan.table())
    if plan.fits is False:
        raise ConfigError(f"tune: the largest trial of the search space does not fit ({plan.total / GIB:.1f} GiB "
                          f"estimated, {plan.budget / GIB:.1f} GiB usable):\n{plan.table()}\n"  # type: ignore[operator]
                          "see `ray-qlora plan`; lower data.max_seq_length or training.batch_size, or set "
                          "training.gradient_checkpointing: true")
    return {"checked": True, "peak_gib": round(plan.total / GIB, 2), "budget_gib": round((budget or 0) / GIB, 2),
            "auto": why}


def _gpu_memory(gpus: float) -> float | None:
    """Total memory of a GPU the trials will get, asked of a GPU node (one short task)."""
    import ray

    @ray.remote(num_gpus=min(gpus, 1.0), num_cpus=0)
    def total() -> float:
        import torch

        return float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else 0.0

    try:
        found = ray.get(total.remote(), timeout=120)
    except ray.exceptions.GetTimeoutError:
        return None
    return found or None


def trial_resources(cfg: PipelineConfig) -> dict[str, float]:
    """One GPU per trial where the cluster has GPUs (or as configured), CPUs always."""
    import ray

    gpus = cfg.tune.gpus_per_trial
    if gpus == "auto":
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return {"cpu": cfg.tune.cpus_per_trial, "gpu": float(gpus)}


def _scheduler(cfg: PipelineConfig) -> tuple[Any, Any]:
    """(scheduler, search algorithm): ASHA by default, synchronous halving on request, or neither."""
    a = cfg.tune.asha
    if not a.enabled:
        return None, _searcher(cfg)
    if a.synchronous:
        from ray_qlora.halving import CohortGenerator, SyncHalving

        cohort = CohortGenerator(cfg.tune.max_concurrent_trials, set())
        return SyncHalving(grace_period=a.grace_period, reduction_factor=a.reduction_factor, cohort=cohort,
                           max_t=_reports_per_trial(cfg)), cohort
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class RecordingASHA(ASHAScheduler):
        """ASHA that remembers which trials it stopped, so the leaderboard states its decision, not a guess."""

        label = "ASHA"

        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.stopped: set[str] = set()

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision == TrialScheduler.STOP:
                self.stopped.add(trial.trial_id)
            return decision

    return RecordingASHA(time_attr="training_iteration", grace_period=a.grace_period,
                         reduction_factor=a.reduction_factor, max_t=10_000), _searcher(cfg)


def _reports_per_trial(cfg: PipelineConfig) -> int | None:
    """Evaluations (Tune reports) in a whole trial when max_steps fixes it; None when epochs decide."""
    t = cfg.training
    searched = {tunable_path(k) for k in cfg.tune.search_space}
    if t.max_steps <= 0 or searched & {("training", "max_steps"), ("training", "eval_steps")}:
        return None
    return -(-t.max_steps // t.eval_steps)


def _leaderboard(results: "ResultGrid", cfg: PipelineConfig, stopped: set[str] | None,
                 by: str = "ASHA") -> list[dict[str, Any]]:
    """One row per trial, best first by tune.metric; failed trials keep their parameters and error.

    ``stopped``: trial ids the scheduler (``by``) stopped; None after a --resume (its scheduler is
    new), when a trial with fewer reports than the longest is taken as stopped.
    """
    metric, sign = cfg.tune.metric, (1 if cfg.tune.mode == "min" else -1)
    most_reports = _max_reports(results)
    rows = []
    for r in results:
        df = _reports(r)
        params = dict(r.config or {})
        trial = r.path.rstrip("/").split("/")[-1]
        if df is None or metric not in df or df[metric].isna().all():
            rows.append({"trial": trial, "status": "error", "params": params,
                         "error": _first_line(r.error) if r.error else "no metrics reported"})
            continue
        best = df.loc[(df[metric] * sign).idxmin()]
        last = df.iloc[-1]
        early = r.metrics.get("trial_id") in stopped if stopped is not None else len(df) < most_reports
        status = "error" if r.error else f"stopped early by {by}" if early else "completed"
        rows.append({
            "trial": trial, "status": status, "params": params,
            metric: float(best[metric]), "best_eval_loss": float(best["eval_loss"]),
            "best_step": int(best["step"]), "last_step": int(last["step"]), "reports": int(len(df)),
            "tokens_per_s": _num(last.get("tokens_per_s")), "peak_memory_gib": _num(last.get("peak_memory_gib")),
            "cpu_threads": _most(df, "cpu_threads"),
            "wall_s": _num(last.get("time_total_s")), "resumed_from_step": int(df["resumed_from_step"].max() or 0)
            if "resumed_from_step" in df else 0,
            "error": _first_line(r.error) if r.error else None,
            "node_id": last.get("node_id"), "started_at": _num(last.get("started_at")),
            # training's own span on the worker: wall_s also counts the trial's set-up before started_at
            "last_report_at": _num(last.get("reported_at")),
            "adapter_uri": _checkpoint_uri(r, cfg),
            "curve": {"step": [int(x) for x in df["step"]], "eval_loss": [float(x) for x in df["eval_loss"]],
                      "train_loss": [_num(x) for x in df.get("train_loss", [])]},
        })
    return sorted(rows, key=lambda x: sign * x[metric] if metric in x else float("inf"))


def _checkpoint_uri(result: Any, cfg: PipelineConfig) -> str | None:
    """URI of a trial's best checkpoint (its adapter), for the registry's top-k."""
    ckpt = result.get_best_checkpoint(metric=cfg.tune.metric, mode=cfg.tune.mode)
    if ckpt is None:
        return None
    fs_type = type(ckpt.filesystem).__name__ if ckpt.filesystem is not None else ""
    return ("s3://" if "S3" in fs_type else "") + ckpt.path


def _first_line(err: BaseException) -> str:
    """The error a trial ended with, as the user needs it: its last line (the exception), not the stack."""
    text = str(err).strip().splitlines()
    tail = [line for line in text if line and not line.startswith(" ")]
    return (tail[-1] if tail else type(err).__name__)[:500]


def _write_leaderboard(board: list[dict[str, Any]], run: storage.RunPaths, cfg: PipelineConfig) -> str:
    """leaderboard.json (everything) and leaderboard.csv (one flat row per trial); returns the CSV text."""
    import csv
    import io

    storage.write_json(storage.join(run.root, "tune", "leaderboard.json"), board, cfg.storage)
    params = sorted({k for row in board for k in row["params"]})
    cols = ["rank", "trial", "status", *params, cfg.tune.metric, "best_eval_loss", "best_step", "last_step",
            "tokens_per_s", "peak_memory_gib", "cpu_threads", "wall_s", "resumed_from_step", "error"]
    buf = io.StringIO()
    out = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(cols)), extrasaction="ignore")
    out.writeheader()
    for rank, row in enumerate(board, 1):
        out.writerow({"rank": rank, **row["params"], **{k: v for k, v in row.items() if k != "params"}})
    fs, path = storage.resolve(storage.join(run.root, "tune", "leaderboard.csv"), cfg.storage)
    with fs.open_output_stream(path) as f:
        f.write(buf.getvalue().encode())
    return buf.getvalue()


def format_leaderboard(board: list[dict[str, Any]], metric: str) -> str:
    """A plain-text table of the trials for the terminal."""
    lines = [f"{'#':>2}  {'status':<22} {metric:>12} {'step':>5} {'tok/s':>7}  params"]
    for rank, row in enumerate(board, 1):
        value = f"{row[metric]:.4f}" if metric in row else "-"
        tps = f"{row['tokens_per_s']:.0f}" if row.get("tokens_per_s") else "-"
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items())
        extra = f"  ({row['error']})" if row.get("error") else ""
        lines.append(f"{rank:>2}  {row['status']:<22} {value:>12} {row.get('best_step', '-'):>5} {tps:>7}  "
                     f"{params}{extra}")
    return "\n".join(lines)


def _num(x: Any) -> float | None:
    """A metric value, None where the trial had not logged one yet."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if f != f else f


def _most(df: Any, column: str) -> int | None:
    """The largest whole value a trial reported in ``column``; None where it reported none (a GPU trial's
    CPU threads)."""
    if column not in df or df[column].isna().all():
        return None
    return int(df[column].max())


def _reports(result: Any) -> Any:
    """A trial's reports, one per step: a trial retried from an earlier checkpoint reports the steps after
    it again, and the retry's report is the one its training went on from."""
    df = result.metrics_dataframe
    return df.drop_duplicates("step", keep="last") if df is not None and "step" in df else df


def _max_reports(results: "ResultGrid") -> int:
    return max((len(df) for df in map(_reports, results) if df is not None), default=0)


def _plot_curves(board: list[dict[str, Any]], png_uri: str, cfg: PipelineConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in board:
        if "curve" in row:
            label = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items())
            ax.plot(row["curve"]["step"], row["curve"]["eval_loss"], marker="o", label=label or row["trial"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("eval loss")
    ax.set_title("Tune trials: eval loss")
    ax.legend(fontsize=8)
    storage.write_figure(fig, png_uri, cfg.storage)


def tune(cfg: PipelineConfig, run: storage.RunPaths, resume: bool = False) -> dict[str, Any]:
    """Run the trials (or finish an interrupted search); returns the best trial's params, metric and adapter URI."""
    from ray import tune as rt

    from ray_qlora.train import train_trial

    resources = trial_resources(cfg)
    planned = preflight(cfg, resources)
    scheduler, search_alg = _scheduler(cfg)
    fs, root_path = storage.resolve(run.root, cfg.storage)
    # The config reaches trials through the object store, not the search space: the space holds only
    # what is sampled, so searchers and the leaderboard see the real parameters.
    trainable = rt.with_resources(
        rt.with_parameters(train_trial, cfg_json=cfg.model_dump_json(), run_root=run.root), resources)
    trials_path = f"{root_path.rstrip('/')}/trials"
    if resume:
        if not rt.Tuner.can_restore(trials_path, storage_filesystem=fs):
            raise StageOrderError(f"tune --resume: no interrupted search under {run.root}/trials; run `ray-qlora "
                                  "tune` without --resume")
        log.info("tune: resuming the search under %s/trials", run.root)
        tuner = rt.Tuner.restore(trials_path, trainable, resume_errored=True, storage_filesystem=fs)
    else:
        tuner = rt.Tuner(
            trainable,
            param_space=search_space(cfg),
            tune_config=rt.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, scheduler=scheduler,
                                      search_alg=search_alg, num_samples=cfg.tune.num_samples,
                                      # the cohort generator caps itself (paused trials aside)
                                      max_concurrent_trials=None if cfg.tune.asha.synchronous and scheduler
                                      else cfg.tune.max_concurrent_trials,
                                      time_budget_s=cfg.tune.time_budget_s),
            run_config=rt.RunConfig(name="trials", storage_path=root_path, storage_filesystem=fs,
                                    failure_config=rt.FailureConfig(max_failures=cfg.tune.max_failures),
                                    callbacks=_callbacks(cfg, run),
                                    checkpoint_config=rt.CheckpointConfig(
                                        num_to_keep=2, checkpoint_score_attribute=cfg.tune.metric,
                                        checkpoint_score_order=cfg.tune.mode),
                                    verbose=1),
        )
    log.info("tune: trials with %s each", resources)
    results = tuner.fit()
    board = _leaderboard(results, cfg, None if resume else getattr(scheduler, "stopped", set()),
                         by=getattr(scheduler, "label", "ASHA"))
    _write_leaderboard(board, run, cfg)
    print(format_leaderboard(board, cfg.tune.metric), flush=True)
    if not any(cfg.tune.metric in row for row in board):
        errors = "; ".join(row.get("error") or "" for row in board)
        raise RuntimeError(f"tune: no trial reported {cfg.tune.metric} ({errors or 'no errors recorded'})")
    _plot_curves(board, storage.join(run.root, "tune", "eval_loss.png"), cfg)

    best = results.get_best_result(metric=cfg.tune.metric, mode=cfg.tune.mode, scope="all")
    ckpt = best.get_best_checkpoint(metric=cfg.tune.metric, mode=cfg.tune.mode)
    prefix = "s3://" if run.root.startswith("s3://") else ""
    summary = {
        "best_trial": board[0]["trial"],
        "best_params": dict(best.config or {}),
        "metric": cfg.tune.metric,
        "best_value": board[0][cfg.tune.metric],
        "best_eval_loss": board[0]["best_eval_loss"],
        "best_adapter_uri": prefix + ckpt.path,
        "trials": len(board),
        "failed_trials": sum(1 for row in board if row["status"] == "error"),
        "resources_per_trial": resources,
        "memory_plan": planned,
        "leaderboard_uri": storage.join(run.root, "tune", "leaderboard.json"),
        "leaderboard_csv_uri": storage.join(run.root, "tune", "leaderboard.csv"),
    }
    log.info("tune: best trial %s %s %.4f params %s", summary["best_trial"], cfg.tune.metric,
             summary["best_value"], summary["best_params"])
    return summary
