"""Regenerate ``ray_metrics.txt``: the metric names a local Ray with Serve and Tune really exports.

    .venv/bin/python infra/monitoring/scrape_ray_metrics.py            # writes infra/monitoring/ray_metrics.txt
    .venv/bin/python infra/monitoring/scrape_ray_metrics.py --check    # prints the names, writes nothing

It starts a fresh local Ray (metrics export port, dashboard), runs a two-trial
Tune search, deploys a small Serve app (autoscaled, multiplexed, with the
project's own ``_Metrics``), sends good, failing and unrouted requests, then
scrapes every target of Ray's Prometheus service discovery file until the set
of names stops growing. GPU gauges cannot show on a machine without a GPU, so
their names are taken from the installed Ray's reporter agent and listed in a
section of their own. The project's own series are printed, not written: the
code is their source of truth, and Ray exports a metric defined as NAME as
``ray_NAME`` (so ``qlora_requests`` shows as ``ray_qlora_requests_total``),
the rule tests/test_infra.py applies.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

OUT = Path(__file__).with_name("ray_metrics.txt")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{|\s)")
# What must show before the scrape may stop: Serve's proxy exports on its own, slower schedule.
REQUIRED = ("ray_serve_num_http_requests_total", "ray_serve_num_http_error_requests_total",
            "ray_serve_http_request_latency_ms_bucket", "ray_serve_deployment_replica_healthy",
            "ray_qlora_requests_total", "ray_node_cpu_utilization")


def series_names(text: str) -> set[str]:
    """Names of the samples in a Prometheus text exposition (comments skipped)."""
    return {m.group(1) for line in text.splitlines() if (m := SAMPLE.match(line))}


def _targets() -> list[str]:
    """host:port of every target Ray's service discovery file lists (nodes, dashboard, autoscaler)."""
    import ray

    node = ray._private.worker.global_worker.node
    sd = Path(node.get_session_dir_path()) / "prom_metrics_service_discovery.json"
    targets = {f"127.0.0.1:{node.metrics_export_port}"}
    if sd.is_file():
        for group in json.loads(sd.read_text()):
            targets.update(group["targets"])
    return sorted(targets)


def _scrape_all() -> set[str]:
    names: set[str] = set()
    for target in _targets():
        try:
            names |= series_names(urllib.request.urlopen(f"http://{target}/metrics", timeout=10).read().decode())
        except (OSError, urllib.error.URLError):
            pass  # a target that is not up yet shows on the next round
    return names


def _run_tune(storage: str) -> None:
    from ray import tune

    def trainable(config: dict[str, float]) -> None:
        for step in range(3):
            tune.report({"eval_loss": config["lr"] / (step + 1), "tokens_per_s": 100.0})

    tune.Tuner(tune.with_resources(trainable, {"cpu": 1}), param_space={"lr": tune.grid_search([0.1, 0.2])},
               run_config=tune.RunConfig(name="scrape", storage_path=storage, verbose=0)).fit()


def _deploy_serve(port: int) -> str:
    from fastapi import FastAPI, HTTPException
    from ray import serve

    from ray_qlora.serve.deployment import _Metrics

    api = FastAPI()

    @serve.deployment(autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2})
    @serve.ingress(api)
    class Probe:
        def __init__(self) -> None:
            self.metrics = _Metrics("scrape")

        @serve.multiplexed(max_num_models_per_replica=2)
        async def _model(self, model_id: str) -> str:
            return model_id

        @api.get("/ok")
        async def ok(self) -> dict[str, str]:
            self.metrics.response("/ok", 200, 0.01)
            self.metrics.generated("unary", 0.01, 3)
            self.metrics.adapters.set(1, tags={"model": "scrape"})
            return {"status": "ok"}

        @api.get("/fail")
        async def fail(self) -> None:
            self.metrics.response("/fail", 500, 0.01)
            raise HTTPException(500, "on purpose")

        @api.get("/crash")
        async def crash(self) -> None:
            raise RuntimeError("an unhandled error, on purpose")

        @api.get("/adapter")
        async def adapter(self) -> dict[str, str]:
            return {"model": await self._model(serve.get_multiplexed_model_id())}

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Probe.bind(), name="scrape", route_prefix="/scrape")
    return f"http://127.0.0.1:{port}/scrape"


def _requests(base: str) -> None:
    def get(path: str, headers: dict[str, str] | None = None) -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(base + path, headers=headers or {}), timeout=30).read()
        except urllib.error.HTTPError:
            pass  # the 4xx/5xx answers are the point

    for _ in range(5):
        get("/ok")
    get("/fail")
    get("/crash")
    get("/no-such-route")
    for model in ("a", "b", "c"):
        get("/adapter", {"serve_multiplexed_model_id": model})


def scrape(timeout: float = 150.0) -> set[str]:
    import ray
    from ray import serve

    from ray_qlora.local_s3 import free_port

    ray.init(address="local", num_cpus=2, include_dashboard=True, _metrics_export_port=free_port(),
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _run_tune(tmp)
        base = _deploy_serve(free_port())
        deadline, names, stable = time.time() + timeout, set(), 0
        while time.time() < deadline:
            _requests(base)
            time.sleep(5)
            new = _scrape_all() | names
            stable = stable + 1 if new == names else 0
            names = new
            if stable >= 3 and all(r in names for r in REQUIRED):
                break
        missing = [r for r in REQUIRED if r not in names]
        if missing:
            raise SystemExit(f"never exported: {missing}; qlora-like: {sorted(n for n in names if 'qlora' in n)}")
        serve.shutdown()
    finally:
        ray.shutdown()
    return names


def gpu_gauges() -> list[str]:
    """GPU gauges of the installed Ray's reporter agent: exported only on nodes that have GPUs."""
    from ray.dashboard.modules.reporter import reporter_agent

    return sorted(f"ray_{n}" for n in reporter_agent.METRICS_GAUGES if n.startswith(("node_gpu", "node_gram")))


def render(names: set[str], gpu: list[str]) -> str:
    import ray

    ray_names = sorted(n for n in names if "qlora_" not in n)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    head = [
        f"# Metric names exported by Ray {ray.__version__} (Ray core, dashboard, Tune, Serve), one a line.",
        f"# Produced {when} by infra/monitoring/scrape_ray_metrics.py: a fresh local Ray with a metrics export",
        "# port and the dashboard, a two-trial Tune search, a Serve app (autoscaling, multiplexing, 200/404/500",
        "# answers), then a scrape of every target in Ray's prom_metrics_service_discovery.json until the set",
        "# stopped growing. Series names as PromQL sees them (histograms with _bucket/_sum/_count).",
        "# Re-run that script after upgrading Ray; tests/test_infra.py checks dashboards against this file.",
        "",
    ]
    gpu_head = ["", f"# GPU gauges (no GPU on the machine that scraped): ray.dashboard.modules.reporter."
                    f"reporter_agent.METRICS_GAUGES of Ray {ray.__version__}, with Ray's ray_ prefix."]
    return "\n".join(head + ray_names + gpu_head + [g for g in gpu if g not in names]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="print the names, write nothing")
    args = parser.parse_args()
    names = scrape()
    ours = sorted(n for n in names if "qlora_" in n)
    print("project series seen:", ours, file=sys.stderr)
    text = render(names, gpu_gauges())
    if args.check:
        print(text)
    else:
        OUT.write_text(text)
        print(f"wrote {OUT} ({len(text.splitlines())} lines)", file=sys.stderr)


if __name__ == "__main__":
    main()
