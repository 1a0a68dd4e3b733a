"""A prepared run on the sample data, on a local Ray, for the Tune benchmarks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def prepared_run(root: Path, base: str, run_id: str, **sections: Any) -> Any:
    """A Run whose prepare stage has succeeded (sample data under ``root``, a local output folder)."""
    from ray_qlora.config import parse_config
    from ray_qlora.data.sample import SYSTEM_PROMPT
    from ray_qlora.demo import upload_sample
    from ray_qlora.pipeline import Run, run_stage

    cfg: dict[str, Any] = {
        "run": {"output_uri": str(root / "out"), "run_id": run_id, "seed": 7},
        "data": {"input_uris": [str(root / "raw")], "system_prompt": SYSTEM_PROMPT, "max_seq_length": 256,
                 "eval_fraction": 0.125},
        "model": {"base": base},
        "training": {"batch_size": 4, "logging_steps": 5, "eval_max_examples": 16},
        "tune": {"max_concurrent_trials": 2, "cpus_per_trial": 1},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    parsed = parse_config(cfg)
    if not (root / "raw").exists():
        upload_sample(str(root / "raw"), parsed.storage)
    run = Run(parsed, run_id)
    run_stage(run, "prepare")
    return run


def start_ray(cpus: int) -> None:
    import ray

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
