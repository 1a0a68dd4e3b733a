"""serve.engine: which engine serves, the vLLM engine's settings, and the request rewriting in front of it.

Fast checks without a cluster; tests/test_serve_vllm.py runs the vLLM engine for real.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import pytest

from ray_qlora.config import ConfigError, parse_config
from ray_qlora.serve.api import APIError

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

HEAD16 = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 512}  # the shared tiny model
HEAD64 = {"hidden_size": 576, "num_attention_heads": 9, "max_position_embeddings": 8192}  # SmolLM2-135M


def _cfg(output_uri: str = "/tmp/out", **serve: Any) -> Any:
    return parse_config({"run": {"output_uri": output_uri}, "data": {"input_uris": ["x"]},
                         "model": {"base": "/tmp/base"}, "serve": {"auth": "none", **serve}})


def test_transformers_when_asked() -> None:
    from ray_qlora.serve.deployment import choose_engine

    assert choose_engine(_cfg(engine="transformers"), HEAD64, on_gpu=False)[0] == "transformers"


def test_strict_tools_the_transformers_engine_cannot_hold_are_refused_before_deploying(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from ray_qlora.config import ConfigError
    from ray_qlora.serve.deployment import build_application, check_strict_tools

    (tmp_path / "config.json").write_text(json.dumps(HEAD64))
    check_strict_tools(_cfg(engine="transformers", strict_tools=True))  # xgrammar is installed here
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # as if it were not
    check_strict_tools(_cfg(engine="transformers"))  # free calls need no grammar
    with pytest.raises(ConfigError, match=r"serve.strict_tools: the transformers engine .*needs xgrammar"):
        build_application(_cfg(engine="transformers", strict_tools=True, gpus_per_replica=0), str(tmp_path), "m")


def _req(n: int = 1, seed: int | None = None, temperature: float = 0.0) -> tuple:
    """(prompt, n, budget, temperature, top_p, seed, stops, schema, logprobs, bias), as _generate_batch takes it."""
    return ("p", n, 16, temperature, 1.0, seed, (), None, None, None)


def test_a_generate_call_holds_at_most_max_batch_size_rows() -> None:
    from ray_qlora.serve.deployment import batch_plan

    # eight greedy requests of 3 choices: 24 rows, 8 per call, whole requests only
    calls = batch_plan([_req(n=3) for _ in range(8)], max_rows=8)
    assert [idx for _, idx in calls] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # settings split calls; a seeded request is alone even beside an identical one
    mixed = [_req(), _req(temperature=1.0), _req(), _req(seed=3), _req(seed=3)]
    assert sorted(idx for _, idx in batch_plan(mixed, max_rows=8)) == [[0, 2], [1], [3], [4]]
    # one request with more choices than max_batch_size: one call of its own (one seed fixes them all)
    assert [idx for _, idx in batch_plan([_req(), _req(n=16, seed=1), _req()], max_rows=4)] == [[0, 2], [1]]
    settings, _ = batch_plan([_req(n=2, seed=9)], max_rows=8)[0]
    assert settings[:8] == (16, 0.0, 1.0, 9, (), None, None, None)  # what the call is generated with


@needs_vllm
def test_auto_picks_vllm_where_it_runs_and_says_why_not_otherwise() -> None:
    from ray_qlora.serve.deployment import choose_engine

    assert choose_engine(_cfg(), HEAD64, on_gpu=False)[0] == "vllm"
    engine, why = choose_engine(_cfg(), HEAD16, on_gpu=False)
    assert engine == "transformers" and "head size" in why and "16" in why
    assert choose_engine(_cfg(), HEAD16, on_gpu=True)[0] == "vllm"  # the restriction is the CPU backend's
    with pytest.raises(ConfigError, match="serve.engine: vllm cannot serve this model here"):
        choose_engine(_cfg(engine="vllm"), HEAD16, on_gpu=False)


@needs_vllm
def test_vllm_settings_on_cpu_and_gpu() -> None:
    from ray_qlora.serve.vllm_engine import llm_configs

    cfg = _cfg(max_context=1024, kv_cache_gb=0.5, max_batch_size=4, num_replicas=2, max_adapters=0)
    (cpu,) = llm_configs(cfg, "/tmp/out/runs/r/merged", "m", HEAD64, on_gpu=False)
    kw = cpu.engine_kwargs
    assert cpu.model_id == "m" and cpu.accelerator_config.kind == "cpu"
    assert kw["max_model_len"] == 1024 and kw["max_num_seqs"] == 4 and kw["kv_cache_memory_bytes"] == 1 << 29
    assert kw["enforce_eager"] is True  # compile: auto is off on CPU (a minute more per replica start)
    assert cpu.deployment_config["num_replicas"] == 2
    (gpu,) = llm_configs(cfg, "s3://b/out/runs/r/merged", "m", HEAD64, on_gpu=True)
    assert gpu.engine_kwargs["enforce_eager"] is False and "kv_cache_memory_bytes" not in gpu.engine_kwargs
    assert gpu.model_loading_config.model_source.bucket_uri == "s3://b/out/runs/r/merged"
    (given,) = llm_configs(_cfg(max_adapters=0, compile=True, engine_kwargs={"max_num_seqs": 64}), "/m", "m",
                           HEAD64, on_gpu=False)
    assert given.engine_kwargs["max_num_seqs"] == 64 and given.engine_kwargs["enforce_eager"] is False


@needs_vllm
def test_adapters_get_a_lora_engine_on_the_base_only_from_object_storage(tmp_path: Any) -> None:
    from ray_qlora.serve.vllm_engine import BASE_SUFFIX, llm_configs

    (base := tmp_path / "base").mkdir()
    (base / "config.json").write_text("{}")
    local = _cfg(str(tmp_path / "out"), max_adapters=3).model_copy(deep=True)
    local.model.base = str(base)
    assert len(llm_configs(local, "/m", "m", HEAD64, on_gpu=False)) == 1  # vLLM loads LoRA from object storage
    remote = local.model_copy(update={"run": local.run.model_copy(update={"output_uri": "s3://b/out"})})
    merged, adapters = llm_configs(remote, "s3://b/out/runs/r/merged", "m", HEAD64, on_gpu=False)
    assert adapters.model_id == "m" + BASE_SUFFIX and adapters.model_loading_config.model_source == str(base)
    assert adapters.lora_config.dynamic_lora_loading_path == "s3://b/out/adapters"
    assert adapters.lora_config.max_num_adapters_per_replica == 3 and adapters.engine_kwargs["enable_lora"]
    assert "enable_lora" not in merged.engine_kwargs


def _state(**serve: Any) -> Any:
    from ray_qlora.serve.vllm_engine import _State

    return _State(cfg=_cfg(max_new_tokens=64, **serve), model_name="m")


def test_requests_are_capped_and_cleaned_before_the_engine() -> None:
    from ray_qlora.serve.vllm_engine import rewrite_request

    st = _state()
    body, internal = rewrite_request(st, {"model": "m", "messages": [], "chat_template": "{{ evil }}"},
                                     "/v1/chat/completions")
    assert internal is None and body["max_tokens"] == 64 and "chat_template" not in body
    body, _ = rewrite_request(st, {"model": "m", "prompt": "x", "max_tokens": 8}, "/v1/completions")
    assert body["max_tokens"] == 8
    with pytest.raises(APIError) as err:
        rewrite_request(st, {"model": "m", "max_completion_tokens": 65}, "/v1/chat/completions")
    assert err.value.status == 400 and err.value.code == "max_tokens_exceeded" and "65" in err.value.message
    assert rewrite_request(st, {"model": "m", "messages": [], "n": 16}, "/v1/chat/completions")[0]["n"] == 16
    with pytest.raises(APIError) as err:
        rewrite_request(st, {"model": "m", "messages": [], "n": 17}, "/v1/chat/completions")
    assert (err.value.status, err.value.param, err.value.code) == (400, "n", "too_many_choices")
    with pytest.raises(APIError) as err:  # chat's boolean on the legacy endpoint, where it is a count
        rewrite_request(st, {"model": "m", "prompt": "x", "logprobs": True}, "/v1/completions")
    assert err.value.param == "logprobs" and "count" in err.value.message
    assert rewrite_request(st, {"model": "m", "prompt": "x", "logprobs": 2}, "/v1/completions")[0]["logprobs"] == 2


@pytest.mark.parametrize("tools, choice, param", [
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}], "required", "tools"),
    ([{"type": "function", "function": {"name": "f"}}] * 2, None, "tools"),
    ([{"type": "function", "function": {"name": "f"}}], {"type": "function", "function": {"name": "g"}},
     "tool_choice"),
    (None, "required", "tool_choice"),
])
def test_tools_vllm_would_refuse_get_the_same_400_as_on_transformers(tools: Any, choice: Any, param: str) -> None:
    from ray_qlora.serve.vllm_engine import rewrite_request

    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": tools, "tool_choice": choice}
    with pytest.raises(APIError) as err:
        rewrite_request(_state(), body, "/v1/chat/completions")
    assert (err.value.status, err.value.param) == (400, param)
    fine = {**body, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}
    assert rewrite_request(_state(), fine, "/v1/chat/completions")[0]["tool_choice"] == "required"


def test_strict_auto_calls_reach_vllm_as_the_transformers_engines_structural_tag() -> None:
    from ray_qlora.serve.api import ChatCompletionRequest
    from ray_qlora.serve.vllm_engine import rewrite_request

    fn = {"name": "f", "parameters": {"type": "object", "properties": {"u": {"enum": ["a", "b"]}}}}
    msgs = [{"role": "user", "content": "x"}]

    def sent(serve: dict[str, Any], **body: Any) -> dict[str, Any]:
        return rewrite_request(_state(**serve), {"model": "m", "messages": msgs, **body}, "/v1/chat/completions")[0]

    strict = [{"type": "function", "function": {**fn, "strict": True}}]
    tag = ChatCompletionRequest.model_validate({"model": "m", "messages": msgs, "tools": strict}).grammar_spec()
    body = sent({}, tools=strict)
    assert tag is not None and body["structured_outputs"] == {"structural_tag": tag[1]}
    assert body["tools"] == [{"type": "function", "function": fn}]  # the template is shown no 'strict'
    loose = [{"type": "function", "function": fn}]
    assert "structured_outputs" not in sent({}, tools=loose)  # nobody asked
    # the server asks for every request
    assert sent({"strict_tools": True}, tools=loose)["structured_outputs"]["structural_tag"] == tag[1]
    for serve, body in [({"engine_kwargs": {"tool_call_parser": "mistral"}}, {}),  # calls not read as Hermes
                        ({}, {"tool_choice": "required"}),  # a forced call: vLLM's own schema
                        ({}, {"response_format": {"type": "json_object"}}),  # the answer is JSON, as asked
                        ({}, {"structured_outputs": {"regex": "a+"}})]:  # the client's own, left as sent
        assert sent(serve, tools=strict, **body).get("structured_outputs") == body.get("structured_outputs")


def test_an_adapter_with_named_templates_is_rendered_with_the_one_training_used() -> None:
    import time

    from ray_qlora.serve.vllm_engine import _State, rewrite_request

    st = _State(cfg=_cfg("s3://b/out"), model_name="m")
    st.versions["named"] = (time.time(), 1, {"default": "D", "tool_use": "T"})  # as read from the registry
    msgs = [{"role": "user", "content": "x"}]
    plain, _ = rewrite_request(st, {"model": "named", "messages": msgs}, "/v1/chat/completions")
    tools, _ = rewrite_request(st, {"model": "named", "messages": msgs,
                                    "tools": [{"type": "function", "function": {"name": "f"}}]},
                               "/v1/chat/completions")
    assert (plain["chat_template"], tools["chat_template"]) == ("D", "T")


@pytest.mark.parametrize("fmt, param, code", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}, "response_format",
     "invalid_json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}}},
     "response_format", "invalid_json_schema"),
    ({"type": "json_schema"}, "response_format", None),
    ({"type": "yaml"}, "response_format.type", None),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": json.loads('{"items": ' * 70 + '{}' + '}' * 70)}},
     "response_format.json_schema.schema", None),  # too deep to compile in reasonable time
])
def test_response_formats_vllm_would_refuse_get_the_same_400_as_on_transformers(fmt: dict, param: str,
                                                                                 code: str | None) -> None:
    from ray_qlora.serve.vllm_engine import rewrite_request

    with pytest.raises(APIError) as err:
        rewrite_request(_state(), {"model": "m", "messages": [], "response_format": fmt}, "/v1/chat/completions")
    assert (err.value.status, err.value.param, err.value.code) == (400, param, code)
    assert err.value.message.startswith(param + ":") and "Exception" not in err.value.message
    good = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    body, _ = rewrite_request(_state(), {"model": "m", "messages": [], "response_format": good},
                              "/v1/chat/completions")
    assert body["response_format"] == good  # passed to vLLM as sent


@pytest.mark.parametrize("model", ["other", "m--base", "m--base:task/v1", "s3://b/x", "task-a"])
def test_only_the_merged_model_and_registry_names_reach_the_engine(model: str) -> None:
    from ray_qlora.serve.vllm_engine import rewrite_request

    with pytest.raises(APIError) as err:  # a local registry: vLLM serves no adapters from it
        rewrite_request(_state(), {"model": model, "messages": []}, "/v1/chat/completions")
    assert err.value.status == 404 and err.value.code == "model_not_found"
    with pytest.raises(APIError) as missing:
        rewrite_request(_state(), {"messages": []}, "/v1/chat/completions")
    assert missing.value.status == 400
