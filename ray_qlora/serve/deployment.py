"""Stage 5, serve: the merged model behind an OpenAI-compatible Ray Serve app.

One deployment holds the model and the HTTP ingress; requests that arrive
together are batched into one ``generate`` call (grouped by sampling
settings, which a batch must share). Replicas are fixed or autoscaled from
the config.
"""


import asyncio
import json
import logging
import time
from typing import Any

from ray import serve

from ray_qlora import storage
from ray_qlora.config import PipelineConfig, parse_config
from ray_qlora.serve.api import APIError, ChatCompletionRequest, completion_body, make_app, models_body

__all__ = ["ChatServer", "build_app", "deploy"]

log = logging.getLogger(__name__)
app = make_app()


@serve.deployment(name="chat", max_ongoing_requests=32)
@serve.ingress(app)
class ChatServer:
    def __init__(self, cfg_json: str, model_uri: str, model_name: str) -> None:
        import torch

        from ray_qlora.generation import inference_dtype
        from ray_qlora.modeling import load_16bit, load_tokenizer, pick_device

        self.cfg = parse_config(json.loads(cfg_json))
        self.model_name = model_name
        self.created = int(time.time())
        device = pick_device()
        if device == "cpu":
            torch.set_num_threads(max(1, int(self.cfg.serve.cpus_per_replica)))
        local = storage.copy_dir_from(model_uri, None, self.cfg.storage)
        self.tok = load_tokenizer(local, trust_remote_code=self.cfg.model.trust_remote_code)
        self.model = load_16bit(local, inference_dtype(self.cfg.merge.dtype, device), device,
                                 trust_remote_code=self.cfg.model.trust_remote_code)
        self._generate_batch.set_max_batch_size(self.cfg.serve.max_batch_size)

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return models_body(self.model_name, self.created)

    @app.post("/v1/chat/completions")
    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any]:
        if req.model != self.model_name:
            raise APIError(404, f"model {req.model!r} does not exist; GET /v1/models lists {self.model_name!r}",
                           "model", code="model_not_found")
        return completion_body(self.model_name, await self._generate_batch(req))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _generate_batch(self, reqs: list[ChatCompletionRequest]) -> list[dict[str, Any]]:
        from ray_qlora.generation import generate

        cap = self.cfg.serve.max_new_tokens
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault((r.token_budget(cap), r.temperature, r.top_p, r.seed), []).append(i)
        results: list[dict[str, Any]] = [{}] * len(reqs)
        for (budget, temp, top_p, seed), idx in groups.items():
            convs = [[m.model_dump() for m in reqs[i].messages] for i in idx]
            # generate is blocking torch work: keep the event loop free for other requests
            outs = await asyncio.to_thread(generate, self.model, self.tok, convs, budget, len(convs),
                                           temp, top_p, seed)
            for i, o in zip(idx, outs):
                results[i] = o
        return results


def _deployment_options(cfg: PipelineConfig) -> dict[str, Any]:
    import ray

    s = cfg.serve
    gpus = s.gpus_per_replica
    if gpus == "auto":
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": s.cpus_per_replica, "num_gpus": float(gpus)}}
    if s.autoscaling is not None:
        opts["autoscaling_config"] = s.autoscaling.model_dump()
    else:
        opts["num_replicas"] = s.num_replicas or 1
    return opts


def build_app(cfg: PipelineConfig, model_uri: str, model_name: str) -> Any:
    return ChatServer.options(**_deployment_options(cfg)).bind(cfg.model_dump_json(), model_uri, model_name)


def deploy(cfg: PipelineConfig, run: storage.RunPaths, run_id: str) -> dict[str, Any]:
    """Deploy the run's merged model; returns the endpoint's base URL and model name."""
    model_name = cfg.serve.model_name or run_id
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(cfg, run.merged, model_name), name="ray-qlora",
              route_prefix=cfg.serve.route_prefix, blocking=False)
    prefix = cfg.serve.route_prefix.rstrip("/")
    base_url = f"http://{cfg.serve.host}:{cfg.serve.port}{prefix}/v1"
    log.info("serve: %s answering as model %r at %s", run.merged, model_name, base_url)
    return {"base_url": base_url, "model": model_name, "model_uri": run.merged,
            "deployment": _deployment_options(cfg)}
