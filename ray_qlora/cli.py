"""`ray-qlora VERB CONFIG`: a table of verbs, each calling one stage function.

Heavy libraries (torch, transformers, ray) are imported by the stages, not
here, so `ray-qlora validate` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Callable

from ray_qlora.config import PipelineConfig, load_config
from ray_qlora.errors import UserError

__all__ = ["VERBS", "main"]


def _validate(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    space = ", ".join(cfg.tune.search_space) or "none"
    print(f"config OK: data from {len(cfg.data.all_sources())} source(s), base {cfg.model.base}, "
          f"search over {space}, runs under {cfg.run.output_uri}")
    return 0


def _plan(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from ray_qlora.plan import GIB, plan_for_cli

    report = plan_for_cli(cfg, args.params, None if args.gpu_memory_gb is None else args.gpu_memory_gb * GIB)
    print(report.text)
    return 0 if report.fits is not False else 1


def _load_torch_first() -> None:
    """Import torch before a stage touches Ray or S3, while this process's working directory exists.

    Intel oneMKL, linked into libtorch_cpu.so, calls getcwd() while torch is
    imported and, when that fails, exits the process from C: "Intel oneMKL
    FATAL ERROR: Cannot load .../libtorch_cpu.so". A job's driver runs in
    Ray's unpacked working_dir; if that folder is removed while the job runs
    (nodes sharing one Ray temp dir did that: cluster/local-cluster.sh), the
    driver's first `import torch` (tune, right after prepare) kills it.
    Once prepare has used pyarrow's S3 filesystem, that C exit() also skips
    Python's atexit hook that finalises the AWS SDK, whose static destructors
    then crash: "FinalizeS3 was not called", SIGSEGV. Imported first, MKL has
    done its getcwd() and the driver no longer depends on the folder.
    """
    import os

    try:
        os.getcwd()
    except FileNotFoundError:
        raise UserError("this process's working directory no longer exists (deleted while the job or shell "
                        "was in it); run from an existing directory, or resubmit the job") from None
    import torch  # noqa: F401


def _stage(name: str) -> Callable[[PipelineConfig, argparse.Namespace], int]:
    def run(cfg: PipelineConfig, args: argparse.Namespace) -> int:
        from ray_qlora.pipeline import Run, connect_ray, run_stage

        _load_torch_first()
        connect_ray(cfg)
        run = Run(cfg, args.run_id, resume=getattr(args, "resume", False),
                  allow_config_change=args.allow_config_change)
        result = run_stage(run, name)
        if name == "evaluate":
            print(result["table"])
        if name == "serve":
            _serve_until_interrupted(cfg, args, result)
        return 0

    return run


def _serve_until_interrupted(cfg: PipelineConfig, args: argparse.Namespace, served: dict) -> None:
    """On a cluster Serve outlives this process; a local Ray dies with it, so wait."""
    import os

    print(f"serving {served['model']!r} at {served['base_url']}", flush=True)
    if cfg.ray.address or os.environ.get("RAY_ADDRESS") or args.no_wait:
        return
    print("local Ray: serving until Ctrl-C", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def _adapters(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """list | show | publish | delete on the adapter registry (no Ray needed)."""
    import json

    from ray_qlora import adapters

    if args.action == "list":
        print(adapters.format_list(adapters.list_adapters(cfg)))
    elif args.action == "show":
        print(json.dumps(adapters.show(cfg, _required(args, "name"), args.version), indent=2, sort_keys=True))
    elif args.action == "delete":
        for gone in adapters.delete(cfg, _required(args, "name"), args.version):
            print(f"deleted {gone}")
    else:  # publish: a finished search of --run-id
        from ray_qlora.pipeline import Run

        run = Run(cfg, args.run_id or cfg.run.run_id or _required(args, "run_id"))
        for p in adapters.publish_run(cfg, run.paths, run.run_id, run.output("tune"), args.name, args.top_k):
            print(f"published {p['name']}/{p['version']} at {p['uri']}")
    return 0


def _required(args: argparse.Namespace, name: str) -> str:
    value = getattr(args, name)
    if not value:
        raise UserError(f"`ray-qlora adapters {args.action}` needs --{name.replace('_', '-')}")
    return value


def _run(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from ray_qlora.pipeline import run_pipeline

    _load_torch_first()
    run = run_pipeline(cfg, run_id=args.run_id, allow_config_change=args.allow_config_change)
    print(run.output("evaluate")["table"])
    _serve_until_interrupted(cfg, args, run.output("serve"))
    return 0


VERBS: dict[str, tuple[str, Callable[[PipelineConfig, argparse.Namespace], int]]] = {
    "validate": ("check a config without running anything", _validate),
    "plan": ("estimate a trial's peak GPU memory: does it fit, and the largest micro-batch that does", _plan),
    "run": ("run every stage, prepare through serve", _run),
    "prepare": ("raw data -> tokenized train/eval shards + quarantine (Ray Data)", _stage("prepare")),
    "tune": ("parallel QLoRA trials, best adapter picked (Ray Tune)", _stage("tune")),
    "merge": ("merge the best adapter into the 16-bit base and verify it", _stage("merge")),
    "evaluate": ("base vs tuned on the held-out split", _stage("evaluate")),
    "serve": ("deploy the merged model behind an OpenAI-compatible API (Ray Serve)", _stage("serve")),
    "adapters": ("the adapter registry: list | show | publish | delete", _adapters),
}


STAGE_VERBS = ("run", "prepare", "tune", "merge", "evaluate", "serve")


def _add_set(parser: argparse.ArgumentParser) -> None:
    """--set KEY=VALUE, the same on every verb that reads a config (load_config parses and checks it)."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config key, e.g. --set training.learning_rate=1e-4 (repeatable)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ray-qlora", description="QLoRA fine-tuning on Ray, from object storage to an endpoint.")
    sub = p.add_subparsers(dest="verb", required=True)
    for verb, (help_, _) in VERBS.items():
        sp = sub.add_parser(verb, help=help_)
        if verb == "adapters":
            sp.add_argument("action", choices=("list", "show", "publish", "delete"))
        sp.add_argument("config", help="pipeline YAML file")
        sp.add_argument("--run-id", help="run folder name (default: run.run_id, else a timestamp)")
        sp.add_argument("--no-wait", action="store_true", help="return after deploying even on a local Ray")
        _add_set(sp)
        if verb in STAGE_VERBS:
            sp.add_argument("--allow-config-change", action="store_true",
                            help="run although the config changes what earlier stages of the run were built from")
        if verb == "adapters":
            sp.add_argument("--name", help="adapter name (publish: default adapters.name, else the run id)")
            sp.add_argument("--version", help="v1, v2, ... (default: the latest; delete: every version)")
            sp.add_argument("--top-k", type=int, help="publish: also the runners-up, as <name>-rank2 ...")
        if verb == "tune":
            sp.add_argument("--resume", action="store_true",
                            help="finish an interrupted search of this run (same trials, from their checkpoints)")
        if verb == "plan":
            sp.add_argument("--gpu-memory-gb", type=float,
                            help="memory of the GPU to plan for, as cards are labelled (24 for a 24 GB card); "
                                 "default: this machine's GPU, else common cards")
            sp.add_argument("--params", type=float,
                            help="plan for a Llama-shape model of this many parameters (e.g. 7e9), no weights needed")
    d = sub.add_parser("demo", help="the embedded default: local S3 + local Ray + SmolLM2 + sample data")
    d.add_argument("config", nargs="?", default="jobs/configs/demo.yaml")
    d.add_argument("--sample", choices=["orders", "tools"], default="orders",
                   help="the dataset uploaded: medication orders to JSON (default), or the same orders placed "
                        "through a tool (use with jobs/configs/tools.yaml)")
    _add_set(d)
    sub.add_parser("config-schema", help="print the config's JSON schema (for editors and CI); keys: docs/CONFIG.md")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.verb == "demo":
            from ray_qlora.demo import demo

            demo(args.config, sample=args.sample, overrides=args.overrides)
            return 0
        if args.verb == "config-schema":
            import json

            from ray_qlora.config_docs import json_schema

            print(json.dumps(json_schema(), indent=2))
            return 0
        cfg = load_config(args.config, args.overrides)
        return VERBS[args.verb][1](cfg, args)
    except UserError as err:  # the user's to fix: the message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
