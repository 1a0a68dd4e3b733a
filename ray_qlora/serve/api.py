"""The OpenAI-compatible HTTP surface: request schemas and error bodies.

Kept free of Ray and torch so it can be read (and tested) on its own. Every
error a client can cause is a 4xx with OpenAI's body shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["APIError", "ChatCompletionRequest", "ChatMessage", "completion_body", "make_app", "models_body"]


class APIError(Exception):
    """An error to send back as an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.type, "param": self.param, "code": self.code}})


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat request that this server honours; other fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    stream: bool = False
    seed: int | None = None

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, v: bool) -> bool:
        if v:
            raise ValueError("streaming is not supported yet; send stream=false")
        return v

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if v[-1].role == "assistant":
            raise ValueError("the last message must be from the user (or system), not the assistant")
        return v

    def token_budget(self, cap: int) -> int:
        """max_tokens as asked, no more than the server's cap."""
        return min(self.max_completion_tokens or self.max_tokens or cap, cap)


def models_body(model_name: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "ray-qlora"}]}


def completion_body(model_name: str, out: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                     "finish_reason": out["finish_reason"], "logprobs": None}],
        "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                  "total_tokens": out["prompt_tokens"] + out["completion_tokens"]},
    }


def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        msg = "the request body is not valid JSON"
    return APIError(400, f"{'.'.join(loc) + ': ' if loc else ''}{msg}", ".".join(loc) or None).response()


def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return APIError(exc.status_code, str(exc.detail), code=code).response()


def make_app() -> FastAPI:
    """A FastAPI app whose errors all come back in OpenAI's shape."""
    app = FastAPI(title="ray-qlora", docs_url=None, redoc_url=None)
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(APIError, lambda _r, e: e.response())  # type: ignore[arg-type,return-value]
    return app
