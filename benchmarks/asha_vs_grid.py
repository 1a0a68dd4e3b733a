"""ASHA vs the full grid on one search space: trial-steps spent and the best eval loss found.

The same learning-rate x LoRA-rank grid runs twice on the sample data: every
trial to the end, then with ASHA stopping the weak ones at its rungs. Prints
the steps each spent (sum over trials of the last step trained), the best
eval loss each found, and the ratios (target: within 2% of the grid's best
at under half the steps).

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


def search(root: Path, base: str, run_id: str, grid: dict[str, list[Any]], steps: int, asha: bool) -> dict[str, Any]:
    from _runs import prepared_run
    from ray_qlora import storage
    from ray_qlora.pipeline import run_stage

    run = prepared_run(root, base, run_id, training={"max_steps": steps, "eval_steps": max(1, steps // 8),
                                                     "gradient_checkpointing": False},
                       tune={"search_space": {k: {"values": v} for k, v in grid.items()},
                             "asha": {"enabled": asha, "grace_period": 1, "reduction_factor": 3}})
    result = run_stage(run, "tune")
    board = storage.read_json(result["leaderboard_uri"], run.cfg.storage)
    return {"trial_steps": sum(row.get("last_step", 0) for row in board), "best": result["best_eval_loss"],
            "trials": len(board), "stopped_early": sum(row["status"].startswith("stopped") for row in board),
            "board": board}


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
        finally:
            ray.shutdown()
    print_board("grid", full["board"])
    print_board("ASHA", asha["board"])
    if args.out:
        Path(args.out).write_text(json.dumps({"grid": full["board"], "asha": asha["board"]}, indent=1, default=str))
    steps_ratio = asha["trial_steps"] / full["trial_steps"]
    gap = asha["best"] / full["best"] - 1
    print(f"grid: {full['trials']} trials, {full['trial_steps']} trial-steps, best eval loss {full['best']:.4f}")
    print(f"ASHA: {asha['trials']} trials ({asha['stopped_early']} stopped early), {asha['trial_steps']} trial-steps, "
          f"best eval loss {asha['best']:.4f}")
    print(f"ASHA / grid: steps {steps_ratio:.2f}x, best loss {gap:+.1%}  (target: steps < 0.5x, loss within 2%)")
    return {"grid": full, "asha": asha, "steps_ratio": steps_ratio, "best_gap": gap}


if __name__ == "__main__":
    main()
