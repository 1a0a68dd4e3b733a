"""ASHA and synchronous halving vs the full grid on one search space: trial-steps spent, best eval loss.

The same learning-rate x LoRA-rank grid runs three times on the sample data:
every trial to the end; with ASHA (asynchronous) stopping the weak ones at its
rungs; and with synchronous successive halving (``tune.asha.synchronous``),
which judges every trial at each rung before any goes on. Prints the steps
each spent (sum over trials of the last step trained), the best eval loss each
found, the wall time, and the ratios (target: within 2% of the grid's best at
under half the steps).

    python benchmarks/asha_vs_grid.py                          # SmolLM2-135M, 8 trials of 40 steps
    python benchmarks/asha_vs_grid.py --base DIR --smoke       # what the tests run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

GRID = {"learning_rate": [3e-4, 1e-3, 3e-3, 1e-2], "lora_r": [4, 16]}
SMOKE_GRID = {"learning_rate": [1e-3, 1e-2], "lora_r": [4]}


def search(root: Path, base: str, run_id: str, grid: dict[str, list[Any]], steps: int, asha: bool,
           synchronous: bool = False) -> dict[str, Any]:
    import time

    from _runs import prepared_run
    from ray_qlora import storage
    from ray_qlora.pipeline import run_stage

    run = prepared_run(root, base, run_id, training={"max_steps": steps, "eval_steps": max(1, steps // 8),
                                                     "gradient_checkpointing": False},
                       tune={"search_space": {k: {"values": v} for k, v in grid.items()},
                             "asha": {"enabled": asha, "grace_period": 1, "reduction_factor": 3,
                                      "synchronous": synchronous}})
    started = time.monotonic()
    result = run_stage(run, "tune")
    wall = time.monotonic() - started
    board = storage.read_json(result["leaderboard_uri"], run.cfg.storage)
    return {"trial_steps": sum(row.get("last_step", 0) for row in board), "best": result["best_eval_loss"],
            "trials": len(board), "stopped_early": sum(row["status"].startswith("stopped") for row in board),
            "wall_s": wall, "board": board}


def print_board(name: str, board: list[dict[str, Any]]) -> None:
    """Each trial's parameters, steps trained, best eval loss and status, in the order they started."""
    print(f"{name}:")
    for row in sorted(board, key=lambda r: r.get("started_at") or 0):
        params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items())
        print(f"  {params:<32} steps {row.get('last_step', 0):>4}  best eval loss {row.get('best_eval_loss', float('nan')):.4f}"
              f"  {row['status']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--smoke", action="store_true", help="a 2-trial grid of a few steps")
    p.add_argument("--out", help="write both leaderboards (with their loss curves) to this JSON file")
    args = p.parse_args(argv)

    import ray

    from _runs import start_ray

    grid, steps = (SMOKE_GRID, 8) if args.smoke else (GRID, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        start_ray(2)
        try:
            full = search(Path(tmp), args.base, "grid", grid, steps, asha=False)
            asha = search(Path(tmp), args.base, "asha", grid, steps, asha=True)
            sha = search(Path(tmp), args.base, "sha", grid, steps, asha=True, synchronous=True)
        finally:
            ray.shutdown()
    runs = {"grid": full, "ASHA": asha, "SHA": sha}
    for name, res in runs.items():
        print_board(name, res["board"])
    if args.out:
        Path(args.out).write_text(json.dumps({k: v["board"] for k, v in runs.items()}, indent=1, default=str))
    for name, res in runs.items():
        stopped = f" ({res['stopped_early']} stopped early)" if res["stopped_early"] else ""
        print(f"{name}: {res['trials']} trials{stopped}, {res['trial_steps']} trial-steps, best eval loss "
              f"{res['best']:.4f}, {res['wall_s']:.0f} s")
    out: dict[str, Any] = {"grid": full, "asha": asha, "sha": sha}
    for name, res in (("ASHA", asha), ("SHA", sha)):
        steps_ratio, gap = res["trial_steps"] / full["trial_steps"], res["best"] / full["best"] - 1
        print(f"{name} / grid: steps {steps_ratio:.2f}x, best loss {gap:+.1%}, wall {res['wall_s'] / full['wall_s']:.2f}x"
              "  (target: steps < 0.5x, loss within 2%)")
        out[name.lower() + "_ratios"] = {"steps": steps_ratio, "best_gap": gap}
    out["steps_ratio"], out["best_gap"] = out["asha_ratios"]["steps"], out["asha_ratios"]["best_gap"]
    return out


if __name__ == "__main__":
    main()
