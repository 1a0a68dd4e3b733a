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
from ray_qlora.config import PipelineConfig, SearchDim

if TYPE_CHECKING:
    from ray.tune import ResultGrid

__all__ = ["search_space", "trial_resources", "tune"]

log = logging.getLogger(__name__)


def _dim(d: SearchDim) -> Any:
    from ray import tune as rt

    if d.values is not None:
        return rt.grid_search(d.values)
    if d.choice is not None:
        return rt.choice(d.choice)
    if d.loguniform is not None:
        return rt.loguniform(*d.loguniform)
    return rt.uniform(*d.uniform)  # type: ignore[misc]


def search_space(cfg: PipelineConfig) -> dict[str, Any]:
    """Tune param_space: the sampled keys plus what every trial needs to find its inputs."""
    return {name: _dim(d) for name, d in cfg.tune.search_space.items()}


def trial_resources(cfg: PipelineConfig) -> dict[str, float]:
    """One GPU per trial where the cluster has GPUs (or as configured), CPUs always."""
    import ray

    gpus = cfg.tune.gpus_per_trial
    if gpus == "auto":
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return {"cpu": cfg.tune.cpus_per_trial, "gpu": float(gpus)}


def _leaderboard(results: "ResultGrid") -> list[dict[str, Any]]:
    rows = []
    for r in results:
        df = r.metrics_dataframe
        if df is None or "eval_loss" not in df:
            rows.append({"trial": r.path.rstrip("/").split("/")[-1], "status": "error",
                         "error": str(r.error) if r.error else "no metrics", "params": {}})
            continue
        best = df.loc[df["eval_loss"].idxmin()]
        rows.append({
            "trial": r.metrics.get("trial_id"),
            "params": {k: v for k, v in r.config.items() if k not in ("cfg_json", "run_root")},
            "best_eval_loss": float(best["eval_loss"]),
            "best_step": int(best["step"]),
            "last_step": int(df["step"].iloc[-1]),
            "reports": int(len(df)),
            "status": "error" if r.error else ("stopped early" if len(df) < _max_reports(results) else "completed"),
            "curve": {"step": [int(s) for s in df["step"]], "eval_loss": [float(x) for x in df["eval_loss"]],
                      "train_loss": [_num(x) for x in df.get("train_loss", [])]},
        })
    return sorted(rows, key=lambda x: x.get("best_eval_loss", float("inf")))


def _num(x: Any) -> float | None:
    """A metric value, None where the trial had not logged one yet."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if f != f else f


def _max_reports(results: "ResultGrid") -> int:
    return max((len(r.metrics_dataframe) for r in results if r.metrics_dataframe is not None), default=0)


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


def tune(cfg: PipelineConfig, run: storage.RunPaths) -> dict[str, Any]:
    """Run the trials; returns the best trial's params, eval loss and adapter URI."""
    from ray import tune as rt
    from ray.tune.schedulers import ASHAScheduler

    from ray_qlora.train import train_trial

    resources = trial_resources(cfg)
    param_space = {**search_space(cfg), "cfg_json": cfg.model_dump_json(), "run_root": run.root}
    scheduler = None
    if cfg.tune.asha.enabled:
        scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=cfg.tune.asha.grace_period,
                                  reduction_factor=cfg.tune.asha.reduction_factor, max_t=10_000)
    fs, root_path = storage.resolve(run.root, cfg.storage)
    tuner = rt.Tuner(
        rt.with_resources(train_trial, resources),
        param_space=param_space,
        tune_config=rt.TuneConfig(metric=cfg.tune.metric, mode="min", scheduler=scheduler,
                                  num_samples=cfg.tune.num_samples,
                                  max_concurrent_trials=cfg.tune.max_concurrent_trials),
        run_config=rt.RunConfig(name="trials", storage_path=root_path, storage_filesystem=fs,
                                checkpoint_config=rt.CheckpointConfig(
                                    num_to_keep=2, checkpoint_score_attribute="eval_loss",
                                    checkpoint_score_order="min"),
                                verbose=1),
    )
    log.info("tune: trials with %s each", resources)
    results = tuner.fit()
    board = _leaderboard(results)
    storage.write_json(storage.join(run.root, "tune", "leaderboard.json"), board, cfg.storage)
    if not any("best_eval_loss" in row for row in board):
        errors = "; ".join(str(r.error) for r in results if r.error)
        raise RuntimeError(f"tune: no trial reported an eval loss ({errors or 'no errors recorded'})")
    _plot_curves(board, storage.join(run.root, "tune", "eval_loss.png"), cfg)

    best = results.get_best_result(metric="eval_loss", mode="min", scope="all")
    ckpt = best.get_best_checkpoint(metric="eval_loss", mode="min")
    prefix = "s3://" if run.root.startswith("s3://") else ""
    summary = {
        "best_trial": best.metrics.get("trial_id"),
        "best_params": {k: v for k, v in best.config.items() if k not in ("cfg_json", "run_root")},
        "best_eval_loss": min(r["best_eval_loss"] for r in board if "best_eval_loss" in r),
        "best_adapter_uri": prefix + ckpt.path,
        "trials": len(board),
        "resources_per_trial": resources,
        "leaderboard_uri": storage.join(run.root, "tune", "leaderboard.json"),
    }
    log.info("tune: best trial %s eval_loss %.4f params %s", summary["best_trial"],
             summary["best_eval_loss"], summary["best_params"])
    return summary
