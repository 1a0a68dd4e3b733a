"""Print jobs/runtime_env.yaml plus this shell's variables a job needs, as JSON for `--runtime-env-json`.

Variables exported in the shell that runs `ray job submit` do not reach the
job: only the runtime env's `env_vars` do. This adds to the file's env_vars
every variable the config's values refer to (`${NAME}`, `${NAME:-default}`;
not those in comments, which the job ignores too) that is set here, every
RAY_QLORA_* variable set here (e.g. RAY_QLORA_API_KEYS), and the extra NAMEs
given; a `${NAME}` without default that is not set is an error now rather
than in the job.

    ray job submit --address http://HEAD:8265 --working-dir . \\
      --runtime-env-json "$(python jobs/runtime_env.py jobs/configs/cluster.yaml)" -- \\
      python -m ray_qlora.cli run jobs/configs/cluster.yaml --no-wait

(`ray job submit` takes --runtime-env or --runtime-env-json, not both, hence
one JSON with the file's settings and the variables.) Values end up in the
job's metadata, visible on the dashboard: give real secrets to the nodes
(instance role, a mounted Secret), not here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout, where ray_qlora may not be installed
from ray_qlora import env_refs  # noqa: E402  (standard library only: safe without the package's deps)

BASE = ROOT / "jobs" / "runtime_env.yaml"


def runtime_env(config: Path, extra: list[str], base: Path = BASE) -> dict:
    env = yaml.safe_load(base.read_text()) or {}
    env_vars = dict(env.get("env_vars") or {})
    missing = []
    try:
        data = yaml.safe_load(config.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SystemExit(f"error: cannot read the config {config}: {err}") from None
    for _key, name, default in env_refs.references(data):
        if name in os.environ:
            env_vars[name] = os.environ[name]
        elif default is None:
            missing.append(name)
    env_vars.update({k: v for k, v in os.environ.items() if k.startswith("RAY_QLORA_")})
    for name in extra:
        if name not in os.environ:
            missing.append(name)
        else:
            env_vars[name] = os.environ[name]
    if missing:
        raise SystemExit(f"error: set {', '.join(sorted(set(missing)))} in this shell first "
                         f"({config} or the command line needs them in the job)")
    env["env_vars"] = env_vars
    return env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", type=Path, help="the pipeline YAML the job will run")
    p.add_argument("names", nargs="*", help="more variables to pass (e.g. AWS_ACCESS_KEY_ID for a local store)")
    args = p.parse_args()
    json.dump(runtime_env(args.config, args.names), sys.stdout)


if __name__ == "__main__":
    main()
