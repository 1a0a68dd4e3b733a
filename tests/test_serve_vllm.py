"""serve.engine: vllm on CPU: Ray Serve LLM + vLLM behind the project's keys, limits and registry names.

One deployment for the module, made by ``deploy`` as the pipeline makes it:
a tiny Llama (head size 32, which vLLM's CPU attention supports) as the run's
merged model in the local object store, and one adapter in the registry,
served on the same base by a second vLLM engine with LoRA on. Clients are the
`openai` SDK and raw HTTP.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from conftest import save_tiny_llama
from ray_qlora import storage
from ray_qlora.config import parse_config
from ray_qlora.local_s3 import free_port

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")]

KEY = "vllm-key"
MODEL = "tiny-vllm"
PROMPT = [{"role": "user", "content": "Give 5 mg PO daily"}]


@pytest.fixture(scope="module")
def tiny32_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama whose heads are 32 wide (the shared tiny model's 16 are below vLLM's CPU minimum)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny32"), tokenizer_dir, heads=2, kv_heads=1)


def _adapter(model_dir: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # far from zero, so the adapter visibly changes the answers
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def served(ray_local: None, local_s3: Any, tiny32_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[dict[str, Any]]:
    from ray import serve

    from ray_qlora import adapters
    from ray_qlora.serve.deployment import deploy

    tmp = tmp_path_factory.mktemp("vllm")
    (tmp / "keys").write_text(KEY)
    port = free_port()
    cfg = parse_config({
        "run": {"output_uri": "s3://vllm-bucket/out"}, "data": {"input_uris": ["x"]},
        "model": {"base": str(tiny32_dir)}, "merge": {"dtype": "float32"}, "export": {"ollama": False},
        "serve": {"engine": "vllm", "port": port, "max_new_tokens": 32, "max_context": 256,
                  "max_body_bytes": 8192, "api_key_file": str(tmp / "keys"), "max_adapters": 2,
                  "kv_cache_gb": 0.25, "cpus_per_replica": 1, "app_name": "vllm-app"}})
    local_s3.create_bucket("vllm-bucket")
    run = storage.RunPaths.for_run(cfg.run.output_uri, "r1")
    storage.copy_dir_to(tiny32_dir, run.merged, cfg.storage)  # the "merged" model is the base itself here
    adapters.publish(cfg, str(_adapter(tiny32_dir, tmp / "adapter")), "task-a", {"run_id": "r1"})
    info = deploy(cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"model_name": MODEL})}), run, "r1")
    assert info["engine"] == "vllm"
    yield {**info, "root": f"http://127.0.0.1:{port}"}
    serve.delete("vllm-app")
    serve.shutdown()


def _client(served: dict[str, Any]) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=served["base_url"].replace("0.0.0.0", "127.0.0.1"), api_key=KEY)


def _ask(client: Any, model: str = MODEL, **kw: Any) -> Any:
    # seeded sampling, not greedy: a random tiny model's greedy answer is often one token repeated
    return client.chat.completions.create(**{"model": model, "messages": PROMPT, "max_tokens": 12, "temperature": 1.0,
                                             "seed": 7, **kw})


def test_models_lists_the_merged_model_and_registry_adapters(served: dict[str, Any]) -> None:
    ids = [m.id for m in _client(served).models.list().data]
    assert ids == [MODEL, "task-a"]  # the engine-internal base ('...--base') is never listed


def test_chat_is_deterministic_with_a_seed_and_streams_the_same_text(served: dict[str, Any]) -> None:
    client = _client(served)
    one, two = _ask(client), _ask(client)
    text = one.choices[0].message.content
    assert text.strip() and text == two.choices[0].message.content  # the same seed: the same answer twice
    assert _ask(client, seed=8).choices[0].message.content != text  # and the seed is what fixes it
    assert one.model == MODEL and one.usage.completion_tokens == 12 and one.choices[0].finish_reason == "length"
    chunks = list(_ask(client, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_completions_and_content_parts(served: dict[str, Any]) -> None:
    client = _client(served)
    out = client.completions.create(model=MODEL, prompt="The dose is", max_tokens=5, temperature=1.0, seed=7)
    assert out.choices[0].text and out.usage.completion_tokens == 5
    parts = client.chat.completions.create(
        model=MODEL, max_tokens=12, temperature=1.0, seed=7,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Give 5 mg PO daily"}]}])
    assert parts.choices[0].message.content == _ask(client).choices[0].message.content


def test_logprobs_have_the_shape_the_transformers_engine_gives(served: dict[str, Any]) -> None:
    client = _client(served)
    out = _ask(client, logprobs=True, top_logprobs=2).choices[0]
    assert out.message.content == _ask(client).choices[0].message.content  # asking does not change the answer
    content = out.logprobs.content
    assert "".join(t.token for t in content).strip() == out.message.content.strip() and len(content) == 12
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)
    text = client.completions.create(model=MODEL, prompt="The dose is", max_tokens=5, temperature=1.0, seed=7,
                                     logprobs=1).choices[0]
    assert "".join(text.logprobs.tokens) == text.text and len(text.logprobs.token_logprobs) == 5


def test_logit_bias_takes_token_ids_as_on_the_transformers_engine(served: dict[str, Any], tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    (mg,) = AutoTokenizer.from_pretrained(str(tokenizer_dir))(" mg", add_special_tokens=False)["input_ids"]
    out = _ask(_client(served), max_tokens=4, logit_bias={str(mg): 100})
    assert out.choices[0].message.content.strip() == "mg mg mg mg"


def test_stop_strings_end_the_answer(served: dict[str, Any]) -> None:
    client = _client(served)
    full = _ask(client, max_tokens=32).choices[0].message.content
    words = full.split()
    assert len(words) > 2, full
    stop = words[len(words) // 2]  # a word from the middle of the answer
    cut = _ask(client, max_tokens=32, stop=[stop]).choices[0]
    assert stop not in cut.message.content and full.startswith(cut.message.content)
    assert cut.finish_reason == "stop"


def test_response_format_makes_answers_follow_the_schema(served: dict[str, Any]) -> None:
    import jsonschema
    from openai import BadRequestError

    # at most 30 tokens however the model spells it (one character a token, then EOS): within the 32 allowed
    schema = {"type": "object", "properties": {"route": {"enum": ["PO", "IV"]}, "prn": {"type": "boolean"}},
              "required": ["route", "prn"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "order", "schema": schema, "strict": True}}
    client = _client(served)
    assert _ask(client, max_tokens=32).choices[0].finish_reason == "length"  # free, the random model never stops
    for model in (MODEL, "task-a"):  # vLLM's own structured output, on the merged model and on an adapter
        out = _ask(client, model, max_tokens=32, response_format=fmt).choices[0]
        assert out.finish_reason == "stop", out
        answer = json.loads(out.message.content)
        jsonschema.validate(answer, schema)
        # no free whitespace, as the transformers engine writes it: nothing for a small model to loop on
        assert out.message.content == json.dumps(answer)
    with pytest.raises(BadRequestError) as err:  # refused in front of vLLM, in the transformers engine's words
        _ask(client, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}})
    assert (err.value.body["param"], err.value.body["code"]) == ("response_format", "invalid_json_schema")


def test_forced_tool_calls_have_the_shape_the_transformers_engine_gives(served: dict[str, Any]) -> None:
    import jsonschema
    from openai import BadRequestError

    params = {"type": "object", "properties": {"r": {"enum": ["PO", "IV"]}, "n": {"type": "integer", "minimum": 1,
                                                                                   "maximum": 4}},
              "required": ["r", "n"], "additionalProperties": False}
    tool = {"type": "function", "function": {"name": "order", "parameters": params}}
    client = _client(served)
    for model in (MODEL, "task-a"):
        named = _ask(client, model, max_tokens=32, tools=[tool],
                     tool_choice={"type": "function", "function": {"name": "order"}}).choices[0]
        assert named.finish_reason == "stop", named
        (call,) = named.message.tool_calls
        assert call.function.name == "order" and call.id
        jsonschema.validate(json.loads(call.function.arguments), params)
    # 'auto' (the default with tools): a random model writes no <tool_call>, so it answers in text
    auto = _ask(client, tools=[tool]).choices[0]
    assert auto.message.tool_calls in (None, []) and auto.message.content.strip()
    # strict (OpenAI's 'strict: true'): the structural tag reaches vLLM, and an answer without a call is the
    # text it would have been (greedy: the tag leaves free text alone)
    strict = {"type": "function", "function": {**tool["function"], "strict": True}}
    held, free = (_ask(client, tools=[t], temperature=0).choices[0] for t in (strict, tool))
    assert held.message.tool_calls in (None, []) and held.message.content == free.message.content
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}
    with pytest.raises(BadRequestError) as err:
        _ask(client, tools=[bad], tool_choice="required")
    assert (err.value.body["param"], err.value.body["code"]) == ("tools", "invalid_json_schema")
    with pytest.raises(BadRequestError) as err:
        _ask(client, tools=[tool], tool_choice={"type": "function", "function": {"name": "other"}})
    assert err.value.body["param"] == "tool_choice"


def test_adapters_by_registry_name(served: dict[str, Any]) -> None:
    client = _client(served)
    merged = _ask(client).choices[0].message.content
    latest = _ask(client, model="task-a")
    pinned = _ask(client, model="task-a@v1")
    assert latest.choices[0].message.content == pinned.choices[0].message.content != merged
    assert latest.model == pinned.model == "task-a@v1"  # the client's name, not the engine's '<base>:task-a/v1'


def _post(served: dict[str, Any], body: Any, key: str | None = KEY, path: str = "/v1/chat/completions") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(served["root"] + path, content=data, timeout=120,
                      headers={**headers, "Content-Type": "application/json"})


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert {"message", "type", "code"} <= set(err)
    return err


def test_keys_limits_and_unknown_models_are_refused_with_openai_errors(served: dict[str, Any]) -> None:
    ok = {"model": MODEL, "messages": PROMPT, "max_tokens": 4}
    assert _error(_post(served, ok, key=None), 401)["code"] == "invalid_api_key"
    assert _error(_post(served, ok, key="wrong"), 401)["code"] == "invalid_api_key"
    big = {**ok, "messages": [{"role": "user", "content": "x" * 9000}]}
    assert _error(_post(served, big), 400)["code"] == "request_too_large"
    err = _error(_post(served, {**ok, "max_tokens": 500}), 400)
    assert err["code"] == "max_tokens_exceeded" and "500" in err["message"] and "32" in err["message"]
    long_prompt = {**ok, "messages": [{"role": "user", "content": "dose " * 600}]}  # ~600 tokens, context 256
    err = _error(_post(served, long_prompt), 400)  # vLLM's own check, before any generation
    assert "256" in err["message"] and "context" in err["message"].lower(), err
    for model in ("nope", "task-b", "task-a@v9", f"{MODEL}--base", f"{MODEL}--base:task-a/v1", "../task-a"):
        assert _error(_post(served, {**ok, "model": model}), 404)["code"] == "model_not_found", model
    assert _error(_post(served, b"{not json"), 400)["code"] == "invalid_json"
    assert _post(served, ok).status_code == 200  # and the server still answers


def test_probes_need_no_key(served: dict[str, Any]) -> None:
    assert httpx.get(served["root"] + "/health/live", timeout=30).json() == {"status": "ok"}
    ready = httpx.get(served["root"] + "/health/ready", timeout=60)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_metrics_count_requests_by_status_beside_vllms_own(served: dict[str, Any]) -> None:
    import time
    import urllib.request

    import ray

    assert _post(served, {"model": MODEL, "messages": PROMPT, "max_tokens": 2}, key=None).status_code == 401
    assert _post(served, {"model": MODEL, "messages": PROMPT, "max_tokens": 2}).status_code == 200
    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline, text, ours = time.time() + 90, "", []
    while time.time() < deadline:  # Ray exports every few seconds
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        ours = [line for line in text.splitlines()
                if line.startswith("ray_qlora_requests_total{") and f'model="{MODEL}"' in line]
        statuses = {s for s in ("200", "401") if any(f'status="{s}"' in line for line in ours)}
        if statuses == {"200", "401"} and "\nray_vllm" in text:
            return
        time.sleep(3)
    raise AssertionError(f"missing request counts or vLLM's metrics: {ours} "
                         f"{[line for line in text.splitlines() if 'vllm' in line][:5]}")


def test_replicas_that_cannot_be_placed_are_refused_with_the_numbers(ray_local: None, tiny32_dir: Path) -> None:
    """Serve would wait forever for a replica no node can hold: refused before deploying, with the numbers."""
    from ray_qlora.config import ConfigError
    from ray_qlora.serve.deployment import check_fits

    def cfg(**serve: Any) -> Any:
        return parse_config({"run": {"output_uri": "s3://b/o"}, "data": {"input_uris": ["x"]},
                             "model": {"base": str(tiny32_dir)}, "serve": {"auth": "none", **serve}})

    check_fits(cfg(cpus_per_replica=2), engines=2)  # 2 x 2 of this cluster's 4 CPUs
    with pytest.raises(ConfigError, match=r"2 replica\(s\) \(2 engine\(s\) x 1 at the start\) of 3 CPU each"):
        check_fits(cfg(cpus_per_replica=3), engines=2)
    with pytest.raises(ConfigError, match="1 CPU and 0.5 GPU each"):  # this cluster has no GPU
        check_fits(cfg(gpus_per_replica=0.5), engines=1)
    with pytest.raises(ConfigError, match=r"3 replica\(s\)"):
        check_fits(cfg(num_replicas=3, cpus_per_replica=2), engines=1)
