"""Request validation and error bodies of the OpenAI-compatible API (no Ray needed)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from ray_qlora.serve.api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    Limits,
    check_budget,
    check_logit_bias,
    check_model,
    chat_logprobs,
    chunk_body,
    completion_body,
    make_app,
    sse,
    text_completion_body,
    text_logprobs,
)


@pytest.fixture()
def limits() -> Limits:
    return Limits(max_body_bytes=4096, api_keys=None)


@pytest.fixture()
def client(limits: Limits) -> TestClient:
    """The real app factory with routes that echo what the schemas parsed (the model itself is not needed)."""
    app = make_app(limits)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest) -> dict:
        return {"budget": req.requested_tokens(16), "conversation": req.conversation(), "stops": req.stops}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> dict:
        return {"prompt": req.prompt, "budget": req.requested_tokens(99)}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    return TestClient(app)


def _nested(levels: int) -> dict:
    """An array of arrays ``levels`` deep: one JSON object per level."""
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _call(arguments: str) -> dict:
    return {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


def _err(resp) -> dict:  # noqa: ANN001
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_valid_request_content_parts_and_stops(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={
        "model": "m", "unknown_field": 1, "max_completion_tokens": 7, "stop": "END",
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "line one"},
                                                  {"type": "text", "text": "line two"}]}]})
    assert r.status_code == 200, r.text
    assert r.json() == {"budget": 7, "stops": ["END"], "conversation": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "line one\nline two"}]}
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                 "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.json()["budget"] == 16


@pytest.mark.parametrize("body, param", [
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 17}, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "maybe"}, "stream"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2, "stream": True}, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content.0.type"),
    ({"model": "m", "messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
     "response_format"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
     "response_format.type"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "deep", "schema": _nested(70)}}},
     "response_format.json_schema.schema"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"mg": 5}}, "logit_bias"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"42": 101}}, "logit_bias"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 2.5}, "presence_penalty"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "frequency_penalty": -3}, "frequency_penalty"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [_TOOL, _TOOL]}, "tools"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools.0.function.name"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "function", "function": {"name": "f", "parameters": _nested(70)}}]},
     "tools.0.function.parameters"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [_TOOL],
      "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [_TOOL], "tool_choice": "sometimes"},
     "tool_choice"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [_TOOL], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "response_format"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "sunny"}]},
     "messages.1"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "user"}]}, "messages.1"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"},
                                 {"role": "assistant", "tool_calls": [_call("not json")]},
                                 {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]}, "messages"),
])
def test_bad_requests_are_400_with_openai_body(client: TestClient, body: dict, param: str) -> None:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    err = _err(r)
    assert err["type"] == "invalid_request_error" and err["param"] == param


@pytest.mark.parametrize("field, value", [("functions", [{"name": "f"}]), ("best_of", 3), ("suffix", "}")])
def test_fields_the_engine_cannot_honour_are_refused_not_ignored(client: TestClient, field: str, value) -> None:  # noqa: ANN001
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    r = client.post("/v1/chat/completions", json={**body, field: value})
    assert r.status_code == 400
    err = _err(r)
    assert (err["param"], err["code"]) == (field, "unsupported_parameter") and field in err["message"]
    # the same field at the value that asks for nothing is fine (clients often send the defaults)
    harmless = {"functions": [], "best_of": 1, "suffix": None}[field]
    assert client.post("/v1/chat/completions", json={**body, field: harmless}).status_code == 200


def test_response_format_becomes_one_schema_text() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    one = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                "response_format": fmt})
    assert one.schema_text is not None and json.loads(one.schema_text) == schema
    # the schema's own key order is kept: it is the order the grammar writes properties in
    assert list(json.loads(one.schema_text)) == ["type", "properties", "required"]
    assert CompletionRequest.model_validate({"model": "m", "prompt": "p", "response_format": fmt}
                                            ).schema_text == one.schema_text
    as_object = CompletionRequest.model_validate({"model": "m", "prompt": "p",
                                                  "response_format": {"type": "json_object"}})
    assert json.loads(as_object.schema_text or "") == {"type": "object"}
    assert CompletionRequest.model_validate({"model": "m", "prompt": "p", "response_format": {"type": "text"}}
                                            ).schema_text is None
    deep_enough = {"type": "json_schema", "json_schema": {"name": "x", "schema": _nested(40)}}
    assert CompletionRequest.model_validate({"model": "m", "prompt": "p", "response_format": deep_enough}).schema_text


def test_invalid_json_body(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in _err(r)["message"]


def test_unknown_model_is_404_in_openai_words() -> None:
    check_model("served", "served")
    with pytest.raises(APIError) as err:
        check_model("other", "served")
    assert (err.value.status, err.value.code, err.value.param) == (404, "model_not_found", "model")
    assert "'served'" in err.value.message


def test_unknown_route_and_method(client: TestClient) -> None:
    r = client.get("/v1/nope")
    assert r.status_code == 404 and _err(r)["code"] == "not_found"
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405


def test_completions_schema(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "m", "prompt": ["Once upon"]})
    assert r.status_code == 200 and r.json() == {"prompt": "Once upon", "budget": 16}  # OpenAI's default 16
    for body, param in (({"model": "m", "prompt": ["a", "b"]}, "prompt"), ({"model": "m", "prompt": ""}, "prompt"),
                        ({"model": "m", "prompt": "a", "echo": True}, "echo")):
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400 and _err(r)["param"] == param


@pytest.mark.parametrize("prompt_tokens, requested, code", [(10, 17, "max_tokens_exceeded"),
                                                            (60, 16, "context_length_exceeded")])
def test_token_limits_name_the_limit_and_the_value(prompt_tokens: int, requested: int, code: str) -> None:
    assert check_budget(10, 16, 16, 64, "max_tokens") == 16
    with pytest.raises(APIError) as err:
        check_budget(prompt_tokens, requested, 16, 64, "max_tokens")
    assert err.value.status == 400 and err.value.code == code
    assert str(requested if code == "max_tokens_exceeded" else prompt_tokens + requested) in err.value.message
    assert ("16" if code == "max_tokens_exceeded" else "64") in err.value.message


def test_body_over_the_limit_is_refused_before_parsing(client: TestClient) -> None:
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}
    r = client.post("/v1/chat/completions", json=big)
    assert r.status_code == 400 and _err(r)["code"] == "request_too_large"
    assert "limit of 4096" in _err(r)["message"]

    def chunks():  # no content-length: counted as it streams in
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    r = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 400 and _err(r)["code"] == "request_too_large"


async def _call_asgi(app, chunks: list[bytes | None], gap_s: float) -> tuple[int, dict]:  # noqa: ANN001
    """Drive ``app`` as a server would: body parts ``gap_s`` apart, and ``None`` for a part that never comes."""
    import asyncio

    parts = iter(chunks)
    sent: list[dict] = []

    async def receive() -> dict:
        part = next(parts, b"")
        if part is None:  # what a re-routed request sees: its body was taken by the replica that died
            await asyncio.Event().wait()
        await asyncio.sleep(gap_s)
        return {"type": "http.request", "body": part, "more_body": part != b""}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "headers": [(b"content-type", b"application/json")], "http_version": "1.1",
             "scheme": "http", "server": ("test", 80), "client": ("test", 1), "root_path": ""}
    await asyncio.wait_for(app(scope, receive, send), 10)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)


def test_a_body_that_stops_arriving_is_a_408_not_a_hang(client: TestClient, limits: Limits) -> None:
    import asyncio

    limits.body_timeout_s = 0.3
    request = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, body = asyncio.run(_call_asgi(client.app, [request[:10], None], gap_s=0))
    assert status == 408, body
    assert body["error"]["code"] == "request_timeout" and "serve.body_timeout_s" in body["error"]["message"]
    # a slow body whose every part comes within the timeout is read whole
    status, body = asyncio.run(_call_asgi(client.app, [request[:10], request[10:30], request[30:]], gap_s=0.1))
    assert status == 200 and body["conversation"] == [{"role": "user", "content": "hi"}], body


def test_api_keys(client: TestClient, limits: Limits) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    limits.api_keys = ["k-one", "k-two"]
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 401 and _err(r)["code"] == "invalid_api_key" and "didn't provide" in _err(r)["message"]
    r = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer k-wrong"})
    assert r.status_code == 401 and _err(r)["message"] == "Incorrect API key provided"
    assert "k-wrong" not in r.text and "k-one" not in r.text  # keys are never echoed
    for key in ("k-one", "k-two"):
        assert client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert client.get("/health").status_code == 200  # probes need no key
    limits.api_keys = None
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_api_keys_from_env_and_file(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from ray_qlora.config import ConfigError, parse_config
    from ray_qlora.serve.deployment import api_keys

    def cfg(**serve: object) -> object:
        return parse_config({"run": {"output_uri": "x"}, "data": {"input_uris": ["x"]}, "serve": serve})

    monkeypatch.delenv("RAY_QLORA_API_KEYS", raising=False)
    with pytest.raises(ConfigError, match="no key is set.*RAY_QLORA_API_KEYS.*serve.auth: none"):
        api_keys(cfg())
    assert api_keys(cfg(auth="none")) is None
    monkeypatch.setenv("RAY_QLORA_API_KEYS", "a, b,,")
    (tmp_path / "keys").write_text("c\n\nd\n")
    assert api_keys(cfg(api_key_file=str(tmp_path / "keys"))) == ["a", "b", "c", "d"]


def test_a_tool_conversation_reaches_the_template_as_templates_read_it(client: TestClient) -> None:
    """The assistant's earlier call (arguments as an object, as chat templates write them) and the tool's answer."""
    r = client.post("/v1/chat/completions", json={"model": "m", "tools": [_TOOL], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [_call('{"city": "Paris"}')]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]})
    assert r.status_code == 200, r.text
    assert r.json()["conversation"][1:] == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]


def test_tools_belong_to_chat() -> None:
    with pytest.raises(APIError) as err:
        CompletionRequest.model_validate({"model": "m", "prompt": "p", "tools": [_TOOL]})
    assert (err.value.param, err.value.code) == ("tools", "unsupported_parameter")
    assert CompletionRequest.model_validate({"model": "m", "prompt": "p", "tools": []}).prompt == "p"


def test_tool_calls_in_answers_and_chunks() -> None:
    call = _call('{"city": "Paris"}')
    out = {"text": None, "finish_reason": "tool_calls", "prompt_tokens": 5, "completion_tokens": 9,
           "tool_calls": [call]}
    message = completion_body("m", [out])["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None, "tool_calls": [call]}
    plain = completion_body("m", [{**out, "text": "hi", "tool_calls": None}])["choices"][0]["message"]
    assert plain == {"role": "assistant", "content": "hi"}  # no tool_calls key when none were made
    chunk = chunk_body("chat", "id1", "m", None, tool_calls=[call, {**call, "id": "call_2"}])
    assert chunk["choices"][0]["delta"] == {"tool_calls": [{"index": 0, **call}, {"index": 1, **call, "id": "call_2"}]}


def test_stream_chunks_follow_openai_shapes() -> None:
    first = chunk_body("chat", "id1", "m", "", first=True)
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {"role": "assistant",
                                                                                          "content": ""}
    last = chunk_body("chat", "id1", "m", None, finish_reason="stop")
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    usage = chunk_body("chat", "id1", "m", None, usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 3
    assert chunk_body("text", "id2", "m", "abc")["choices"][0]["text"] == "abc"
    assert last["choices"][0]["logprobs"] is None  # not asked for


def test_one_choice_per_answer_and_the_prompt_counted_once() -> None:
    outs = [{"text": "a", "finish_reason": "stop", "prompt_tokens": 5, "completion_tokens": 2},
            {"text": "b c", "finish_reason": "length", "prompt_tokens": 5, "completion_tokens": 3}]
    chat = completion_body("m", outs)
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in chat["choices"]] == [
        (0, "a", "stop"), (1, "b c", "length")]
    assert chat["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    assert [c["text"] for c in text_completion_body("m", outs)["choices"]] == ["a", "b c"]
    assert ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], n=16).n == 16
    with pytest.raises(APIError) as err:
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], n=17)
    assert (err.value.param, err.value.code) == ("n", "too_many_choices")


def test_logit_bias_is_sorted_token_ids_checked_against_the_vocabulary() -> None:
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}],
                                logit_bias={"42": -100, "7": 5, "9": 0})
    assert req.bias_items == ((7, 5.0), (42, -100.0))  # a zero bias asks for nothing and is dropped
    check_logit_bias(req.bias_items, 43)
    with pytest.raises(APIError) as err:
        check_logit_bias(req.bias_items, 42)
    assert (err.value.status, err.value.param, err.value.code) == (400, "logit_bias", "invalid_logit_bias")
    assert "42" in err.value.message and "0 to 41" in err.value.message


def test_logprobs_requests_and_bodies_follow_openai_shapes() -> None:
    user = [{"role": "user", "content": "x"}]
    assert ChatCompletionRequest(model="m", messages=user).logprob_top is None
    assert ChatCompletionRequest(model="m", messages=user, logprobs=True).logprob_top == 0
    assert ChatCompletionRequest(model="m", messages=user, logprobs=True, top_logprobs=3).logprob_top == 3
    # the legacy API counts: logprobs=0 still asks for each token's own logprob
    assert CompletionRequest(model="m", prompt="p", logprobs=0).logprob_top == 0
    assert CompletionRequest(model="m", prompt="p").logprob_top is None
    with pytest.raises(ValueError, match="logprobs is a count"):  # chat's boolean, not silently read as 1
        CompletionRequest(model="m", prompt="p", logprobs=True)
    entries = [{"token": " 5", "logprob": -0.25, "offset": 0, "top": [(" 5", -0.25), (" five", -float("inf"))]},
               {"token": "é", "logprob": -1.5, "offset": 2, "top": [("é", -1.5), ("e", -2.0)]}]
    chat = chat_logprobs(entries)
    assert chat["content"][0] == {"token": " 5", "logprob": -0.25, "bytes": [32, 53], "top_logprobs": [
        {"token": " 5", "logprob": -0.25, "bytes": [32, 53]}, {"token": " five", "logprob": -9999.0,
                                                              "bytes": [32, 102, 105, 118, 101]}]}
    assert chat["content"][1]["bytes"] == [0xC3, 0xA9]  # UTF-8 bytes, so clients can rejoin split characters
    json.dumps(chat, allow_nan=False)  # no -Infinity: that is not JSON
    assert text_logprobs(entries) == {"tokens": [" 5", "é"], "token_logprobs": [-0.25, -1.5],
                                      "top_logprobs": [{" 5": -0.25, " five": -9999.0}, {"é": -1.5, "e": -2.0}],
                                      "text_offset": [0, 2]}
    bare = [{**e, "top": []} for e in entries]
    assert text_logprobs(bare)["top_logprobs"] is None and chat_logprobs(bare)["content"][0]["top_logprobs"] == []
    streamed = chunk_body("chat", "id1", "m", " 5é", logprobs=entries)["choices"][0]["logprobs"]
    assert [c["token"] for c in streamed["content"]] == [" 5", "é"]
    assert chunk_body("text", "id2", "m", " 5é", logprobs=entries)["choices"][0]["logprobs"]["text_offset"] == [0, 2]
    assert sse("[DONE]") == "data: [DONE]\n\n" and sse({"a": 1}) == 'data: {"a": 1}\n\n'


def test_api_module_needs_neither_ray_nor_torch() -> None:
    import subprocess
    import sys

    code = "import sys, ray_qlora.serve.api; print('ray' in sys.modules or 'torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
