"""Request validation and error bodies of the OpenAI-compatible API (no Ray needed)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from ray_qlora.serve.api import APIError, ChatCompletionRequest, make_app


@pytest.fixture()
def client() -> TestClient:
    app = make_app()

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest) -> dict:
        if req.model != "m":
            raise APIError(404, "no such model", "model", code="model_not_found")
        return {"budget": req.token_budget(16)}

    return TestClient(app)


def _err(resp) -> dict:  # noqa: ANN001
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_valid_request_and_token_cap(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 500, "unknown_field": 1})
    assert r.status_code == 200 and r.json() == {"budget": 16}


@pytest.mark.parametrize("body, param", [
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}, "stream"),
    ({"model": "m", "messages": [{"role": "assistant", "content": "x"}]}, "messages"),
])
def test_bad_requests_are_400_with_openai_body(client: TestClient, body: dict, param: str) -> None:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    err = _err(r)
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_invalid_json_body(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in _err(r)["message"]


def test_unknown_model_and_route(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"model": "x", "messages": [{"role": "user", "content": "q"}]})
    assert r.status_code == 404 and _err(r)["code"] == "model_not_found"
    r = client.get("/v1/nope")
    assert r.status_code == 404 and _err(r)["code"] == "not_found"
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405
