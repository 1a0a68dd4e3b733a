"""Stage 5, serve: the merged model behind an OpenAI-compatible Ray Serve app.

One deployment holds the model and the HTTP ingress. Non-streamed requests
that arrive together are batched into one ``generate`` call (grouped by
sampling settings, which a batch must share); streamed ones generate on
their own and send server-sent events as tokens come. Every limit (body
size, API key, max tokens, context length) is checked before generation
starts. Replicas are fixed or autoscaled from the config.
"""


import asyncio
import functools
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Union

from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.exceptions import RayServeException

from ray_qlora import storage
from ray_qlora.adapters import NameCache
from ray_qlora.config import ConfigError, PipelineConfig, parse_config
from ray_qlora.generation import TokenBias
from ray_qlora.resources import capacity, live_nodes
from ray_qlora.serve.multi_adapter import AdapterEngine, LoadedAdapter, parse_model_id
from ray_qlora.serve.tools import ToolStream, read_calls
from ray_qlora.structured import Grammars, SchemaError, check_installed
from ray_qlora.serve.api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GrammarSpec,
    Limits,
    check_budget,
    check_logit_bias,
    check_model,
    chunk_body,
    completion_body,
    make_app,
    models_body,
    schema_error,
    sse,
    text_completion_body,
)

__all__ = ["ChatServer", "api_keys", "batch_plan", "build_app", "build_application", "check_fits", "choose_engine",
           "deploy"]

log = logging.getLogger(__name__)
limits = Limits()  # filled in by the replica from its config
app = make_app(limits)

Request = Union[ChatCompletionRequest, CompletionRequest]


def api_keys(cfg: PipelineConfig) -> list[str] | None:
    """The accepted keys (None when serve.auth is 'none'); a ConfigError if auth is on and none are set.

    Read from the environment variable and/or file the config names, never
    from the config itself, and never logged.
    """
    s = cfg.serve
    if s.auth == "none":
        return None
    keys = [k.strip() for k in os.environ.get(s.api_key_env, "").split(",") if k.strip()]
    if s.api_key_file:
        path = Path(s.api_key_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"invalid config: serve.api_key_file: {path} does not exist")
        keys += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not keys:
        raise ConfigError(f"invalid config: serve.auth is 'api_key' but no key is set: put keys in "
                          f"${s.api_key_env} (comma-separated) or serve.api_key_file, or set serve.auth: none "
                          "to open the endpoint on purpose")
    return keys


class _Metrics:
    """The project's Prometheus metrics (Ray exports them with Serve's own on each node's metrics port).

    Serve already counts requests and latency per deployment; these add what
    an LLM endpoint is judged by: status per route, time to first token and
    generated tokens.
    """

    def __init__(self, model: str) -> None:
        from ray.serve import metrics

        self.model = model
        self.requests = metrics.Counter("qlora_requests", "HTTP responses by route and status.",
                                        tag_keys=("model", "route", "status"))
        self.latency = metrics.Histogram("qlora_response_start_seconds",
                                         "Seconds until the response starts (the whole answer unless streamed).",
                                         boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60],
                                         tag_keys=("model", "route"))
        self.ttft = metrics.Histogram("qlora_time_to_first_token_seconds",
                                      "Seconds from a request to its first generated text.",
                                      boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30], tag_keys=("model", "mode"))
        self.tokens = metrics.Counter("qlora_generated_tokens", "Completion tokens generated.",
                                      tag_keys=("model", "mode"))
        self.adapters = metrics.Gauge("qlora_loaded_adapters", "Registry adapters loaded on this replica's base.",
                                      tag_keys=("model",))

    def response(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"model": self.model, "route": route, "status": str(status)})
        self.latency.observe(seconds, tags={"model": self.model, "route": route})

    def generated(self, mode: str, first_token_s: float, tokens: int) -> None:
        self.ttft.observe(first_token_s, tags={"model": self.model, "mode": mode})
        self.tokens.inc(tokens, tags={"model": self.model, "mode": mode})


# Defined before ChatServer: Serve serializes the deployment's class where it is declared, with the module
# globals its methods use as they are at that point.
def batch_plan(reqs: list[tuple], max_rows: int) -> list[tuple[tuple[Any, ...], list[int]]]:
    """The generate calls for a batch of requests: (shared settings, the requests' indices) per call.

    ``reqs``: (prompt, n, *settings) each. Only requests with equal settings share a call. A seeded one
    samples alone: rows of one call draw from one random stream, so sharing it with another request (even
    an identical one) would change its answer. A call holds at most ``max_rows`` rows (a request's n
    choices are n rows), so n does not multiply a call's memory; a request asking more choices than that
    still gets one call of its own, so that one seed fixes them all.
    """
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (_, _, *settings) in enumerate(reqs):
        seeded = settings[3] is not None
        groups.setdefault((*settings, i) if seeded else tuple(settings), []).append(i)
    plan: list[tuple[tuple[Any, ...], list[int]]] = []
    for settings, idx in groups.items():
        call: list[int] = []
        for i in idx:
            if call and sum(reqs[j][1] for j in call) + reqs[i][1] > max_rows:
                plan.append((settings, call))
                call = []
            call.append(i)
        plan.append((settings, call))
    return plan


@serve.deployment(name="chat", max_ongoing_requests=32)
@serve.ingress(app)
class ChatServer:
    def __init__(self, cfg_json: str, model_uri: str, model_name: str) -> None:
        import torch

        from ray_qlora.generation import inference_dtype
        from ray_qlora.modeling import load_16bit, load_tokenizer, pick_device

        self.cfg = parse_config(json.loads(cfg_json))
        self.metrics = _Metrics(model_name)
        limits.max_body_bytes, limits.api_keys = self.cfg.serve.max_body_bytes, api_keys(self.cfg)
        limits.body_timeout_s = self.cfg.serve.body_timeout_s
        limits.on_response = self.metrics.response
        self.model_name = model_name
        self.created = int(time.time())
        device = pick_device()
        if device == "cpu":
            torch.set_num_threads(max(1, int(self.cfg.serve.cpus_per_replica)))
        local = storage.copy_dir_from(model_uri, None, self.cfg.storage)
        self.tok = load_tokenizer(local, trust_remote_code=self.cfg.model.trust_remote_code)
        self.model = load_16bit(local, inference_dtype(self.cfg.merge.dtype, device), device,
                                trust_remote_code=self.cfg.model.trust_remote_code)
        model_context = int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)
        self.context = min(self.cfg.serve.max_context or model_context, model_context)
        self._generate_batch.set_max_batch_size(self.cfg.serve.max_batch_size)
        self.grammars = Grammars(self.tok, int(self.model.config.vocab_size))
        self.adapters: AdapterEngine | None = None
        if self.cfg.serve.max_adapters:
            self.adapters = AdapterEngine(self.cfg)
            engine = self.adapters

            async def load(model_id: str) -> LoadedAdapter:
                return await asyncio.to_thread(engine.load, model_id)

            # Serve's multiplexing: an LRU of loaded adapters per replica (evicted ones are unloaded)
            self._adapter = serve.multiplexed(max_num_models_per_replica=self.cfg.serve.max_adapters)(load)
        self._names = NameCache()

    # -- probes ------------------------------------------------------------------------------------------
    @app.get("/health")
    @app.get("/health/live")
    async def live(self) -> dict[str, str]:
        """Liveness: the replica's event loop answers."""
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready(self) -> dict[str, Any]:
        """Readiness: a one-token generation succeeds."""
        from ray_qlora.generation import generate_text

        try:
            out = await asyncio.to_thread(generate_text, self.model, self.tok, ["ok"], 1)
        except Exception as err:  # noqa: BLE001 - any failure means not ready
            raise APIError(503, f"not ready: {type(err).__name__}: {err}", type_="server_error") from None
        return {"status": "ready", "generated_tokens": out[0]["completion_tokens"]}

    # -- API ---------------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        """The merged model, then every adapter of the registry (when this server loads adapters)."""
        return models_body(self.model_name, self.created, await self._registry_names())

    async def _registry_names(self) -> list[str]:
        return await self._names.names(self.cfg) if self.adapters is not None else []

    def adapter_memory(self) -> dict[str, Any]:
        """Bytes of the shared base and of each loaded adapter (for tests and benchmarks, via a handle)."""
        return self.adapters.memory() if self.adapters is not None else {}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(self, req: ChatCompletionRequest) -> Union[dict[str, Any], StreamingResponse]:
        from ray_qlora.generation import render

        return await self._complete(req, render(self.tok, req.conversation(), req.template_tools()), "chat")

    @app.post("/v1/completions", response_model=None)
    async def completions(self, req: CompletionRequest) -> Union[dict[str, Any], StreamingResponse]:
        return await self._complete(req, str(req.prompt), "text")

    async def _complete(self, req: Request, prompt: str, kind: str) -> Union[dict[str, Any], StreamingResponse]:
        if req.model != self.model_name and self.adapters is not None:
            return await self._complete_adapter(req, kind)
        check_model(req.model, self.model_name)
        budget = self._budget(req, prompt)
        bias = self._bias(req)
        calls = self._tool_reader(req, self.tok, prompt)
        spec = self._grammar_spec(req, self.tok)
        grammar = await self._grammar(self.grammars, req, spec)
        if req.stream:
            return StreamingResponse(self._stream(req, prompt, budget, kind, grammar=grammar, bias=bias,
                                                  tools=self._tool_stream(req, calls, self.tok)),
                                     media_type="text/event-stream")
        started = time.perf_counter()
        outs = await self._generate_batch((prompt, req.n, budget, req.temperature, req.top_p, req.seed,
                                           tuple(req.stops), spec, req.logprob_top, bias))
        self.metrics.generated("batch", time.perf_counter() - started, sum(o["completion_tokens"] for o in outs))
        return self._body(req, kind, [calls(o) for o in outs] if calls else outs)

    @staticmethod
    def _body(req: Request, kind: str, outs: list[dict[str, Any]]) -> dict[str, Any]:
        return (completion_body if kind == "chat" else text_completion_body)(req.model, outs)

    @staticmethod
    def _tool_reader(req: Request, tok: Any, prompt: str) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
        """What reads an answer's tool calls (serve/tools.py); None when the request offers no tools."""
        if not isinstance(req, ChatCompletionRequest) or req.tool_mode == "none":
            return None
        return functools.partial(read_calls, mode=req.tool_mode, name=req.tool_choice_name, tok=tok, prompt=prompt,
                                 functions=req.functions)

    @staticmethod
    def _tool_stream(req: Request, calls: Callable[[dict[str, Any]], dict[str, Any]] | None,
                     tok: Any) -> ToolStream | None:
        if calls is None or not isinstance(req, ChatCompletionRequest):
            return None
        return ToolStream(calls, req.tool_mode, tok)

    async def _complete_adapter(self, req: Request, kind: str) -> Union[dict[str, Any], StreamingResponse]:
        """A request naming a registry adapter: loaded on demand into the shared base, then generated with."""
        engine = self.adapters
        assert engine is not None
        parse_model_id(req.model)  # a 404 for anything that is not a registry name, before any storage call
        await self._adapter(req.model)
        self.metrics.adapters.set(len(engine.loaded()), tags={"model": self.model_name})
        key = req.model
        prompt = (engine.render(key, req.conversation(), req.template_tools())  # type: ignore[union-attr]
                  if kind == "chat" else str(req.prompt))
        budget = self._budget(req, prompt)
        calls = self._tool_reader(req, engine.tok, prompt)
        if engine.grammars is None:
            engine.grammars = Grammars(engine.tok, int(engine.model.config.vocab_size))
        bias = self._bias(req)
        grammar = await self._grammar(engine.grammars, req, self._grammar_spec(req, engine.tok))
        args = (budget, req.temperature, req.top_p, req.seed, req.stops, grammar, req.logprob_top, bias)
        if req.stream:
            events = engine.stream(key, prompt, *args)
            return StreamingResponse(self._stream(req, prompt, budget, kind, events,
                                                  tools=self._tool_stream(req, calls, engine.tok)),
                                     media_type="text/event-stream")
        outs = await asyncio.to_thread(engine.generate, key, [prompt] * req.n, budget, req.n, *args[1:])
        return self._body(req, kind, [calls(o) for o in outs] if calls else outs)

    def _grammar_spec(self, req: Request, tok: Any) -> GrammarSpec | None:
        """What the request's answer is held to: response_format, a forced call, or a strict 'auto' call.

        Strict calls are held only where they are read as Hermes tags (no response_template of the model's
        own); serve.strict_tools makes every 'auto' request strict unless a function says otherwise.
        """
        hermes = getattr(tok, "response_template", None) is None
        return req.grammar_spec(self.cfg.serve.strict_tools, hermes)

    @staticmethod
    async def _grammar(grammars: Grammars, req: Request, spec: GrammarSpec | None) -> Any:
        """The compiled grammar for ``spec`` (None for free text); a 400 before generating.

        Compiled in a thread: a large schema takes a while, and the event loop serves other requests meanwhile.
        """
        if spec is None:
            return None
        try:
            return await asyncio.to_thread(grammars.compile, spec[1], spec[0])
        except SchemaError as err:
            called = isinstance(req, ChatCompletionRequest) and (req.tool_mode in ("required", "named")
                                                                 or spec[0] == "structural_tag")
            raise schema_error(err, "tools" if called else "response_format") from None

    def _bias(self, req: Request) -> TokenBias | None:
        """The request's logit_bias and penalties (None if it sets none); a 400 for a token the model lacks."""
        check_logit_bias(req.bias_items, int(self.model.config.vocab_size))
        bias = TokenBias(req.bias_items, req.presence_penalty or 0.0, req.frequency_penalty or 0.0)
        return bias if bias != TokenBias() else None

    def _budget(self, req: Request, prompt: str) -> int:
        """Completion tokens this request may use; a 400 before any generation if it breaks a limit."""
        cap = self.cfg.serve.max_new_tokens
        requested = req.requested_tokens(cap)
        param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        prompt_tokens = len(self.tok(prompt, add_special_tokens=False)["input_ids"])
        return check_budget(prompt_tokens, requested, cap, self.context, param)

    async def _stream(self, req: Request, prompt: str, budget: int, kind: str,
                      events: Iterator[dict[str, Any]] | None = None, grammar: Any = None,
                      bias: TokenBias | None = None,
                      tools: ToolStream | None = None) -> AsyncIterator[str]:
        """SSE chunks as the text comes; usage last when stream_options.include_usage.

        With ``tools``, text that may be a call is held until the end (tools.ToolStream); the calls come in
        one chunk before the finish.
        """
        from ray_qlora.generation import stream_text

        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        started, first_token_s = time.perf_counter(), None
        if events is None:
            events = stream_text(self.model, self.tok, prompt, budget, req.temperature, req.top_p, req.seed,
                                 req.stops, grammar, req.logprob_top, bias)
        model_name = req.model
        if kind == "chat":
            yield sse(chunk_body("chat", rid, model_name, "", first=True))
        while True:
            # the generator blocks on the model: step it in a thread so other requests are served meanwhile
            event = await asyncio.to_thread(next, events, None)
            if event is None:
                break
            if "text" in event:
                if first_token_s is None:
                    first_token_s = time.perf_counter() - started
                text, logprobs = event["text"], event.get("logprobs")
                if tools is not None:
                    text, logprobs = tools.feed(text, logprobs)
                    logprobs = logprobs if req.logprob_top is not None else None
                    if not text:
                        continue
                yield sse(chunk_body(kind, rid, model_name, text, logprobs=logprobs))  # type: ignore[arg-type]
                continue
            self.metrics.generated("stream", first_token_s or time.perf_counter() - started,
                                   event["completion_tokens"])
            finish, logprobs = event["finish_reason"], event.get("logprobs")
            if tools is not None:
                out, rest, logprobs = tools.finish(finish, logprobs)
                finish, logprobs = out["finish_reason"], logprobs if req.logprob_top is not None else None
                if rest is not None or out["tool_calls"]:
                    yield sse(chunk_body("chat", rid, model_name, rest, tool_calls=out["tool_calls"]))
            # the last tokens' logprobs come with the finish: their text may have been held back until now
            yield sse(chunk_body(kind, rid, model_name, "" if kind == "text" else None,  # type: ignore[arg-type]
                                 finish_reason=finish, logprobs=logprobs))
            if req.include_usage:
                usage = {"prompt_tokens": event["prompt_tokens"], "completion_tokens": event["completion_tokens"],
                         "total_tokens": event["prompt_tokens"] + event["completion_tokens"]}
                yield sse(chunk_body(kind, rid, model_name, None, usage=usage))  # type: ignore[arg-type]
        yield sse("[DONE]")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _generate_batch(self, reqs: list[tuple]) -> list[list[dict[str, Any]]]:
        """(prompt, n, budget, temperature, top_p, seed, stops, grammar spec, logprobs, bias) each: its n answers.

        One generate call per shared setting and at most serve.max_batch_size rows (batch_plan), with a row
        per choice: a request's choices come from one call, so a seeded sample gives n different answers (a
        second call re-seeded would repeat them).
        """
        from ray_qlora.generation import generate_text

        results: list[list[dict[str, Any]]] = [[] for _ in reqs]
        for (budget, temp, top_p, seed, stops, spec, logprobs, bias, *_), idx in batch_plan(
                reqs, self.cfg.serve.max_batch_size):
            prompts = [reqs[i][0] for i in idx for _ in range(reqs[i][1])]
            grammar = self.grammars.compile(spec[1], spec[0]) if spec else None  # compiled (and cached) by _complete
            # generate is blocking torch work: keep the event loop free for other requests
            outs = iter(await asyncio.to_thread(generate_text, self.model, self.tok, prompts, budget, len(prompts),
                                                temp, top_p, seed, list(stops), grammar, logprobs, bias))
            for i in idx:
                results[i] = [next(outs) for _ in range(reqs[i][1])]
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


def app_name(cfg: PipelineConfig, model_name: str) -> str:
    return cfg.serve.app_name or f"ray-qlora-{model_name}"


def choose_engine(cfg: PipelineConfig, model_config: dict[str, Any], on_gpu: bool) -> tuple[str, str]:
    """(engine, why): serve.engine, with 'auto' resolved to vLLM where it can run this model here."""
    from ray_qlora.serve.vllm_engine import engine_problem

    wanted = cfg.serve.engine
    if wanted == "transformers":
        return "transformers", "serve.engine: transformers"
    problem = engine_problem(model_config, on_gpu)
    if problem is None:
        return "vllm", f"serve.engine: {wanted}"
    if wanted == "vllm":
        raise ConfigError(f"invalid config: serve.engine: vllm cannot serve this model here: {problem}; "
                          "set serve.engine: transformers (or auto)")
    return "transformers", f"serve.engine: auto, and {problem}"


def _on_gpu(cfg: PipelineConfig) -> bool:
    return float(_deployment_options(cfg)["ray_actor_options"]["num_gpus"]) > 0


def build_application(cfg: PipelineConfig, model_uri: str, model_name: str) -> tuple[Any, str]:
    """The Serve application for a merged model on the engine serve.engine picks, and that engine's name."""
    model_config = storage.read_json(storage.join(model_uri, "config.json"), cfg.storage)
    on_gpu = _on_gpu(cfg)
    engine, why = choose_engine(cfg, model_config, on_gpu)
    log.info("serve: engine %s (%s)", engine, why)
    if engine == "vllm":
        from ray_qlora.serve.vllm_engine import adapters_served, build_vllm_app

        check_fits(cfg, 2 if adapters_served(cfg) else 1)
        return build_vllm_app(cfg, model_uri, model_name, model_config, on_gpu), engine
    check_strict_tools(cfg)
    check_fits(cfg, 1)
    return build_app(cfg, model_uri, model_name), engine


def check_strict_tools(cfg: PipelineConfig) -> None:
    """A ConfigError naming serve.strict_tools when the transformers engine cannot hold calls to their tools
    (no xgrammar here): deployed, it would refuse every request with tools. vLLM brings its own xgrammar."""
    if cfg.serve.strict_tools:
        check_installed("serve.strict_tools", "the transformers engine holds calls to their tools")


def check_fits(cfg: PipelineConfig, engines: int) -> None:
    """A ConfigError with the numbers when the replicas to start cannot be placed (Serve would wait forever).

    ``engines``: models each holding their own replicas (vLLM serves adapters on a second engine).
    Skipped where the cluster adds nodes on demand (tune.cluster_autoscales).
    """
    import ray

    if cfg.tune.cluster_autoscales or not ray.is_initialized():  # nothing to check against yet
        return
    s = cfg.serve
    replicas = engines * (s.autoscaling.min_replicas if s.autoscaling is not None else (s.num_replicas or 1))
    need = {"CPU": s.cpus_per_replica, "GPU": float(_deployment_options(cfg)["ray_actor_options"]["num_gpus"])}
    nodes = live_nodes()
    held = capacity(nodes, need)  # node by node: three 2-CPU nodes hold three 1.5-CPU replicas, not 6 CPUs' four
    if held >= replicas:
        return
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in need}
    what = f"{s.cpus_per_replica:g} CPU" + (f" and {need['GPU']:g} GPU" if need["GPU"] else "")
    raise ConfigError(
        f"invalid config: serve: {replicas} replica(s) ({engines} engine(s) x "
        f"{replicas // engines} at the start) of {what} each do not fit this cluster: its nodes hold {held}, "
        f"each replica on one node ({total['CPU']:g} CPU, {total['GPU']:g} GPU in {len(nodes)} node(s)); lower "
        "serve.cpus_per_replica or the replicas, set serve.max_adapters: 0 (no adapters engine), or use a bigger "
        "cluster")


def deploy(cfg: PipelineConfig, run: storage.RunPaths, run_id: str) -> dict[str, Any]:
    """Deploy the run's merged model; returns the endpoint's base URL and model name."""
    model_name = cfg.serve.model_name or run_id
    keys = api_keys(cfg)  # a missing key is the user's to fix: say so here, not in a replica that cannot start
    name = app_name(cfg, model_name)
    application, engine = build_application(cfg, run.merged, model_name)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    try:
        serve.run(application, name=name, route_prefix=cfg.serve.route_prefix, blocking=False)
    except RayServeException as err:
        if "is being used by application" not in str(err):
            raise
        raise ConfigError(f"invalid config: serve.route_prefix: {err} Give this model another route prefix, or "
                          "the same serve.app_name to replace that application") from None
    prefix = cfg.serve.route_prefix.rstrip("/")
    base_url = f"http://{cfg.serve.host}:{cfg.serve.port}{prefix}/v1"
    log.info("serve: %s answering as model %r at %s (app %s, auth %s)", run.merged, model_name, base_url, name,
             "on" if keys is not None else "off")
    return {"base_url": base_url, "model": model_name, "model_uri": run.merged, "app": name,
            "auth": cfg.serve.auth, "engine": engine, "deployment": _deployment_options(cfg)}
