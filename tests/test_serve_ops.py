"""The endpoint under operation: Prometheus metrics, autoscaling up and down, a replica killed under load.

Each test deploys the tiny model (any HF folder serves as a "merged" model)
as its own Serve application on a local Ray, and talks to it over HTTP with
the `openai` SDK or httpx, as clients do.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from ray_qlora.config import parse_config
from ray_qlora.local_s3 import free_port

pytestmark = pytest.mark.integration

KEY = "ops-key"


@pytest.fixture(scope="module")
def serve_port(ray_local: None) -> Iterator[int]:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


@pytest.fixture(autouse=True)
def _delete_apps_after(serve_port: int) -> Iterator[None]:
    """Each test's application is deleted after it. Its replicas hold CPUs of the 4-CPU Ray; kept, the
    apps of earlier tests left the last one's replica nowhere to go (serve.run then waits forever)."""
    yield
    from ray import serve

    for name in list(serve.status().applications):
        serve.delete(name)


def _deploy(model_dir: Path, port: int, name: str, tmp_path: Path, **serve_cfg: Any) -> str:
    """Serve ``model_dir`` as app ``name`` under /name; returns its /v1 base URL once ready."""
    from ray import serve

    from ray_qlora.serve.deployment import build_app

    (tmp_path / "keys").write_text(KEY)
    cfg = parse_config({"run": {"output_uri": str(tmp_path)}, "data": {"input_uris": ["x"]},
                        "model": {"base": str(model_dir)}, "merge": {"dtype": "float32"},
                        "serve": {"port": port, "route_prefix": f"/{name}", "max_new_tokens": 32, "cpus_per_replica": 1,
                                  "api_key_file": str(tmp_path / "keys"), **serve_cfg}})
    serve.run(build_app(cfg, str(model_dir), name), name=name, route_prefix=f"/{name}", blocking=False)
    base = f"http://127.0.0.1:{port}/{name}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health/ready", timeout=30).status_code == 200:
                return f"{base}/v1"
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{name} never became ready")


def _running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())


def _chat(base_url: str, content: str = "Give 5 mg PO daily", max_tokens: int = 16, **kw: Any) -> Any:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=KEY, **kw)
    return client.chat.completions.create(model=base_url.split("/")[-2], max_tokens=max_tokens, temperature=0,
                                          messages=[{"role": "user", "content": content}])


def _wait_for_metric(name: str, label: str, value: str, timeout: float = 90) -> None:
    """Poll this node's Prometheus exporter until ``name{...label...} value`` shows (Ray exports every few s)."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline, lines = time.time() + timeout, []
    while time.time() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        lines = [line for line in text.splitlines() if line.startswith(name + "{") and label in line]
        if any(line.rsplit(" ", 1)[-1] == value for line in lines):
            return
        time.sleep(3)
    raise AssertionError(f"{name} with {label} never reached {value}: {lines}")


def test_prometheus_metrics_count_requests_by_status(serve_port: int, tiny_model_dir: Path, tmp_path: Path) -> None:
    import ray

    base = _deploy(tiny_model_dir, serve_port, "metrics-app", tmp_path)
    for _ in range(3):
        _chat(base)
    assert httpx.post(f"{base}/chat/completions", json={}, timeout=30).status_code == 401
    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline, text = time.time() + 90, ""
    while time.time() < deadline:  # Ray exports metrics every few seconds
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        ok = [line for line in text.splitlines() if line.startswith("ray_qlora_requests_total{") and 'model="metrics-app"' in line
              and 'route="/metrics-app/v1/chat/completions"' in line and not line.startswith("#")]
        if any('status="200"' in line and line.rsplit(" ", 1)[-1] == "3.0" for line in ok) and \
                any('status="401"' in line for line in ok) and "serve_num_http_requests" in text:
            break  # the project's counts and Serve's own (its proxy exports on its own schedule)
        time.sleep(3)
    else:
        raise AssertionError("request counts never showed up:\n" + "\n".join(
            line for line in text.splitlines() if "ray_qlora" in line)[:3000])
    # the exported names (Ray prefixes 'ray_' to the code's 'qlora_...'), as dashboards query them
    assert "\nray_qlora_time_to_first_token_seconds_bucket{" in text and "\nray_qlora_generated_tokens_total{" in text
    assert "serve_num_http_requests" in text  # Serve's own metrics, beside the project's


def test_autoscaling_goes_up_under_load_and_back_down(serve_port: int, tiny_model_dir: Path, tmp_path: Path) -> None:
    base = _deploy(tiny_model_dir, serve_port, "scaling-app", tmp_path, autoscaling={
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1,
        "downscale_delay_s": 3, "look_back_period_s": 11})  # the shortest window the config accepts
    assert _running_replicas("scaling-app") == 1
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            _chat(base, max_tokens=32)

    seen_two = False
    with ThreadPoolExecutor(6) as pool:
        for _ in range(6):
            pool.submit(load)
        deadline = time.time() + 120
        while time.time() < deadline and not seen_two:
            seen_two = _running_replicas("scaling-app") == 2
            time.sleep(1)
        stop.set()
    assert seen_two, "6 clients at target_ongoing_requests=1 never brought a second replica"
    deadline = time.time() + 120
    while time.time() < deadline and _running_replicas("scaling-app") != 1:
        time.sleep(1)
    assert _running_replicas("scaling-app") == 1, "the second replica stayed after the load stopped"


def test_killing_a_replica_under_load_loses_no_request(serve_port: int, tiny_model_dir: Path,
                                                        tmp_path: Path) -> None:
    import ray

    base = _deploy(tiny_model_dir, serve_port, "failover-app", tmp_path, num_replicas=2)
    deadline = time.time() + 120
    while _running_replicas("failover-app") < 2 and time.time() < deadline:
        time.sleep(1)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "failover-app" in a["name"] and "SERVE_REPLICA" in a["name"]]
    assert len(replicas) == 2, replicas
    done: list[str] = []

    def one(i: int) -> str:
        # the SDK's defaults: 2 retries with backoff on connection errors and 5xx
        out = _chat(base, content=f"Give {i} mg PO daily", max_tokens=24).choices[0].message.content
        done.append(out)
        return out

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(40)]
        while len(done) < 8:
            time.sleep(0.1)
        victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
        ray.kill(victim, no_restart=True)
        results = [f.result(timeout=300) for f in futures]  # raises if any request was lost
    assert len(results) == 40 and all(isinstance(r, str) for r in results)
    assert len(done) == 40


def test_many_adapters_on_one_base_with_an_lru(serve_port: int, tiny_model_dir: Path, adapter_dir: Path,
                                                tmp_path: Path) -> None:
    """Three registry adapters through a 2-slot LRU: base + N x adapter in memory, the base never reloaded."""
    from openai import BadRequestError, NotFoundError, OpenAI
    from ray import serve

    from ray_qlora import adapters

    registry_cfg = parse_config({"run": {"output_uri": str(tmp_path)}, "data": {"input_uris": ["x"]},
                                 "model": {"base": str(tiny_model_dir)}, "export": {"ollama": False}})
    for name in ("task-a", "task-b", "task-c"):
        adapters.publish(registry_cfg, str(adapter_dir), name, {"run_id": "r"})
    base_url = _deploy(tiny_model_dir, serve_port, "adapters-app", tmp_path, max_adapters=2)
    handle = serve.get_app_handle("adapters-app")
    client = OpenAI(base_url=base_url, api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["adapters-app", "task-a", "task-b", "task-c"]

    def ask(model: str) -> str:
        out = client.chat.completions.create(model=model, max_tokens=8, temperature=0,
                                             messages=[{"role": "user", "content": "Give 5 mg PO daily"}])
        return out.choices[0].message.content

    merged_answer = ask("adapters-app")
    a = ask("task-a")
    one = handle.adapter_memory.remote().result()
    assert list(one["adapters"]) == ["task-a"] and one["adapters"]["task-a"] > 0
    assert one["total_bytes"] == one["base_bytes"] + one["adapters"]["task-a"]
    assert ask("task-b@v1") == a  # the same weights under another name answer the same
    two = handle.adapter_memory.remote().result()
    assert sorted(two["adapters"]) == ["task-a", "task-b@v1"] and two["base_bytes"] == one["base_bytes"]
    assert two["total_bytes"] == two["base_bytes"] + 2 * one["adapters"]["task-a"]
    ask("task-c")  # a third adapter: the least recently used one is unloaded from the base
    three = handle.adapter_memory.remote().result()
    assert sorted(three["adapters"]) == ["task-b@v1", "task-c"]
    _wait_for_metric('ray_qlora_loaded_adapters', 'model="adapters-app"', "2.0")
    assert three["total_bytes"] == two["total_bytes"] and three["base_bytes"] == one["base_bytes"]
    assert ask("task-a") == a  # loaded again on demand
    assert ask("adapters-app") == merged_answer  # the merged model is served beside them, unchanged
    streamed = client.chat.completions.create(model="task-c", max_tokens=8, temperature=0, stream=True,
                                              messages=[{"role": "user", "content": "Give 5 mg PO daily"}])
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == a
    for bad in ("task-z", "task-a@v9", "../etc", "s3://bucket/key", "TASK-A"):
        with pytest.raises(NotFoundError):
            ask(bad)
    # an adapter whose metadata names another base is refused, not loaded onto this one
    meta_path = tmp_path / "adapters" / "task-c" / "v1" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["base_model"]["sha256"] = "0" * 64
    adapters.publish(registry_cfg, str(adapter_dir), "task-d", {"run_id": "r"}, base=meta["base_model"])
    with pytest.raises(BadRequestError, match="trained on another base model"):
        ask("task-d")
