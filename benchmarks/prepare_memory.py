"""Peak RSS of prepare's driver and workers at 1x and 10x the rows: memory must not grow with the data.

Each size runs in a fresh Python process (so the driver's peak is its own)
with a local Ray; a sampler thread records the largest RSS of the driver and
of any Ray worker process while prepare runs. Streaming means the 10x run
may hold more in Ray's object store (shared memory, spilled to disk when
full) but not in any process's private memory: the printed ratios should
stay near 1.

    python benchmarks/prepare_memory.py                 # 20,000 vs 200,000 rows
    python benchmarks/prepare_memory.py --rows 500      # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _peak_rss(rows: int, base: str) -> dict[str, float]:
    """Run prepare on ``rows`` rows here; returns peak RSS in MiB of the driver, the largest worker and
    the largest row actor."""
    import psutil
    import ray

    from _synth import write_dataset
    from ray_qlora.config import parse_config
    from ray_qlora.prepare import prepare
    from ray_qlora.storage import RunPaths

    peaks = {"driver": 0.0, "worker": 0.0, "row_actor": 0.0}
    me = psutil.Process()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peaks["driver"] = max(peaks["driver"], me.memory_info().rss / 2**20)
            for p in psutil.process_iter(["cmdline"]):
                try:
                    # A worker renames itself to what it runs (ray::MapWorker(...), ray::IDLE): match both forms.
                    cmd = " ".join(p.info["cmdline"] or [])
                    if cmd.startswith("ray::") or "default_worker.py" in cmd:
                        # RSS minus shared pages: the object store is shared memory, counted once, not per worker
                        mem = p.memory_full_info()
                        peaks["worker"] = max(peaks["worker"], (mem.rss - mem.shared) / 2**20)
                        if "_RowProcessor" in cmd:
                            peaks["row_actor"] = max(peaks["row_actor"], (mem.rss - mem.shared) / 2**20)
                except (psutil.Error, OSError):
                    pass
            time.sleep(0.2)

    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(Path(tmp) / "raw", rows)
        ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        cfg = parse_config({"run": {"output_uri": f"{tmp}/out"}, "data": {"input_uris": [f"{tmp}/raw"],
                            "cache": False}, "model": {"base": base}})
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            prepare(cfg, RunPaths.for_run(f"{tmp}/out", "mem"))
        finally:
            stop.set()
            thread.join()
            ray.shutdown()
    return peaks


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000, help="the 1x size; the 10x run uses ten times as many")
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size, print JSON
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(_peak_rss(args.one, args.base)), flush=True)
        return {}
    out = {}
    for n in (args.rows, 10 * args.rows):
        proc = subprocess.run([sys.executable, __file__, "--one", str(n), "--base", args.base],
                              capture_output=True, text=True, check=False)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"the {n}-row run failed:\n{proc.stderr[-3000:]}")
        out[n] = json.loads(line[len("RESULT "):])
        print(f"{n:>9,} rows: driver peak {out[n]['driver']:.0f} MiB, largest worker peak {out[n]['worker']:.0f} MiB "
              f"(row actors {out[n]['row_actor']:.0f} MiB)", flush=True)
    small, big = out[args.rows], out[10 * args.rows]
    ratios = {k: big[k] / small[k] for k in small}
    print(f"ratio 10x/1x: driver {ratios['driver']:.2f}, worker {ratios['worker']:.2f}, "
          f"row actor {ratios['row_actor']:.2f}  (target <= 1.3)")
    return {"peaks": out, "ratios": ratios}


if __name__ == "__main__":
    main()
