"""Eval generation throughput: the same held-out rows through 1 and then 2 Ray Data actors.

Both sides run ``ray_qlora.evaluate.generate_on_cluster`` (what the evaluate
stage runs) on a local Ray with 2 CPUs, one CPU thread per actor, the same
rows and greedy settings. Each side's wall time includes starting its actors
and loading the model once per actor, as a user's evaluate pays it. Prints
rows/s and generated tokens/s of each, and the ratio 2 actors / 1 actor
(the cluster's share of the work: about 2 on 2 free cores).

    python benchmarks/eval_throughput.py                        # SmolLM2-135M, 64 rows
    python benchmarks/eval_throughput.py --base DIR --rows 8    # smoke (what the tests run)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _side(run: Any, table: Any, actors: int, batch_size: int, new_tokens: int) -> dict[str, float]:
    from ray_qlora.evaluate import generate_on_cluster

    cfg = run.cfg.with_overrides({"eval.num_actors": actors, "eval.batch_size": batch_size,
                                  "eval.max_new_tokens": new_tokens, "eval.cpus_per_actor": 1})
    start = time.perf_counter()
    out = generate_on_cluster(cfg, table, "base")
    wall = time.perf_counter() - start
    tokens = sum(r["completion_tokens"] for r in out.values())
    used = len({r["actor"] for r in out.values()})
    print(f"    {actors} actor(s): {wall:.1f}s, {len(out)} rows, {tokens} tokens, {used} actor(s) generated",
          flush=True)
    return {"wall_s": wall, "rows_per_s": len(out) / wall, "tokens_per_s": tokens / wall, "actors_used": used,
            "predictions": [out[h]["prediction"] for h in table.column("content_hash").to_pylist()]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--rows", type=int, default=64, help="held-out rows generated on")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args(argv)

    import ray

    from _runs import prepared_run, start_ray
    from ray_qlora.evaluate import eval_rows

    start_ray(2)
    try:
        with tempfile.TemporaryDirectory() as d:
            print("preparing the sample data (a large eval split) ...", flush=True)
            run = prepared_run(Path(d), args.base, "eval-bench", data={"eval_fraction": 0.5})
            table = eval_rows(run.cfg.with_overrides({"eval.max_examples": args.rows}), run.paths)
            print(f"generating on {table.num_rows} rows, {args.new_tokens} new tokens max:", flush=True)
            one = _side(run, table, 1, args.batch_size, args.new_tokens)
            two = _side(run, table, 2, args.batch_size, args.new_tokens)
    finally:
        ray.shutdown()
    ratio = two["rows_per_s"] / one["rows_per_s"]
    same = sum(a == b for a, b in zip(one.pop("predictions"), two.pop("predictions"))) / table.num_rows
    print(f"\n{'':<10}{'wall s':>9}{'rows/s':>9}{'tokens/s':>10}")
    for name, side in (("1 actor", one), ("2 actors", two)):
        print(f"{name:<10}{side['wall_s']:>9.1f}{side['rows_per_s']:>9.2f}{side['tokens_per_s']:>10.1f}")
    print(f"ratio 2 actors / 1 actor (rows/s): {ratio:.2f}x; same answers on {same:.0%} of rows")
    return {"rows": table.num_rows, "one": one, "two": two, "ratio": ratio, "same_answers": same}


if __name__ == "__main__":
    main()
