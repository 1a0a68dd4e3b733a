"""Wall time of one trial under Ray Tune vs the same steps in a bare SFTTrainer, same process budget.

Both sides load the same 4-bit base, train the same steps on the same
prepared split with one CPU thread, and evaluate at the same steps. The bare
side is what a user would otherwise run: a fresh Python process that
imports the libraries and trains (``--bare RUN_ROOT CONFIG_JSON``). The Tune
side is the whole tune stage: the pre-flight plan, the trial's worker, a
checkpoint (adapter + optimizer state) uploaded at every evaluation, the
leaderboard and plot. Prints both times and their ratio (target <= 1.10).
Then the same trial again with ``tune.borrow_idle_cpus`` on (the default):
alone on a 2-CPU Ray, it also runs a thread on the CPU no one holds, as a
search's last trial does once ASHA has stopped the others; prints its time
over the one-thread time.

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


def _timed_tune(run: Any) -> tuple[float, int]:
    """Seconds for the whole tune stage of a prepared run, and the most CPU threads its trial ran on."""
    from ray_qlora import storage
    from ray_qlora.pipeline import run_stage

    start = time.perf_counter()
    result = run_stage(run, "tune")
    seconds = time.perf_counter() - start
    (row,) = storage.read_json(result["leaderboard_uri"], run.cfg.storage)
    return seconds, row["cpu_threads"]


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

    training = {"max_steps": args.steps, "eval_steps": max(1, args.steps // 3), "gradient_checkpointing": False}
    with tempfile.TemporaryDirectory() as tmp:
        start_ray(2)
        try:
            runs = {borrow: prepared_run(Path(tmp), args.base, "borrow" if borrow else "overhead", training=training,
                                         tune={"asha": {"enabled": False}, "borrow_idle_cpus": borrow})
                    for borrow in (False, True)}
            # one thread on both sides: the trial borrows no idle CPU the bare run lacks
            t_bare = bare(runs[False])
            t_tune, threads = _timed_tune(runs[False])
            # the default: the lone trial also runs a thread on the CPU of the 2 that no one holds
            t_borrow, borrow_threads = _timed_tune(runs[True])
        finally:
            ray.shutdown()
    ratio = t_tune / t_bare
    print(f"bare SFTTrainer: {t_bare:.1f}s   one trial under Tune (whole stage): {t_tune:.1f}s   "
          f"ratio {ratio:.2f}  (target <= 1.10)")
    print(f"the same trial borrowing the idle CPU (tune.borrow_idle_cpus, the default): {t_borrow:.1f}s on "
          f"{borrow_threads} threads   ratio to {threads} thread {t_borrow / t_tune:.2f}")
    return {"bare_s": t_bare, "tune_s": t_tune, "ratio": ratio, "threads": threads, "borrow_s": t_borrow,
            "borrow_threads": borrow_threads, "borrow_ratio": t_borrow / t_tune}


if __name__ == "__main__":
    main()
