"""Wall time of one trial under Ray Tune vs the same steps in a bare SFTTrainer, same process budget.

Both sides load the same 4-bit base, train the same steps on the same
prepared split with one CPU thread, and evaluate at the same steps. The bare
side is what a user would otherwise run: a fresh Python process that
imports the libraries and trains (``--bare RUN_ROOT CONFIG_JSON``). The Tune
side is the whole tune stage: the pre-flight plan, the trial's worker, a
checkpoint (adapter + optimizer state) uploaded at every evaluation, the
leaderboard and plot. Prints both times and their ratio (target <= 1.10).

    python benchmarks/tune_overhead.py                       # SmolLM2-135M, 30 steps
    python benchmarks/tune_overhead.py --base DIR --steps 6  # smoke (what the tests run)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def bare(run: Any) -> float:
    """Seconds for the trial's work without Tune, in a fresh process: start, import, load, train, evaluate."""
    import subprocess

    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--bare", run.paths.root, run.cfg.model_dump_json()], check=True)
    return time.perf_counter() - start


def _bare_process(run_root: str, cfg_json: str) -> None:
    import torch

    from ray_qlora.config import parse_config
    from ray_qlora.modeling import resolve_base
    from ray_qlora.storage import RunPaths
    from ray_qlora.train import build_trainer, load_split

    cfg, paths = parse_config(json.loads(cfg_json)), RunPaths(run_root)
    torch.set_num_threads(cfg.tune.cpus_per_trial)
    torch.manual_seed(cfg.run.seed)
    base = resolve_base(cfg.model, cfg.storage)
    train_ds, eval_ds = load_split(paths.train, cfg), load_split(paths.eval, cfg)
    eval_ds = eval_ds.select(range(min(len(eval_ds), cfg.training.eval_max_examples or len(eval_ds))))
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(cfg, base, train_ds, eval_ds, out, "cpu")
        trainer.train()
        if trainer.state.global_step % cfg.training.eval_steps:
            trainer.evaluate()


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--bare", nargs=2, metavar=("RUN_ROOT", "CONFIG_JSON"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bare:
        _bare_process(*args.bare)
        return {}

    import ray

    from _runs import prepared_run, start_ray
    from ray_qlora.pipeline import run_stage

    eval_steps = max(1, args.steps // 3)
    with tempfile.TemporaryDirectory() as tmp:
        start_ray(2)
        try:
            run = prepared_run(Path(tmp), args.base, "overhead",
                               training={"max_steps": args.steps, "eval_steps": eval_steps,
                                         "gradient_checkpointing": False},
                               tune={"asha": {"enabled": False}})
            t_bare = bare(run)
            start = time.perf_counter()
            run_stage(run, "tune")
            t_tune = time.perf_counter() - start
        finally:
            ray.shutdown()
    ratio = t_tune / t_bare
    print(f"bare SFTTrainer: {t_bare:.1f}s   one trial under Tune (whole stage): {t_tune:.1f}s   "
          f"ratio {ratio:.2f}  (target <= 1.10)")
    return {"bare_s": t_bare, "tune_s": t_tune, "ratio": ratio}


if __name__ == "__main__":
    main()
