"""The OpenAI-compatible HTTP surface: request schemas, limits, API keys, error and stream bodies.

Kept free of Ray and torch so it can be read (and tested) on its own. Every
error a client can cause is a 4xx with OpenAI's body shape:
``{"error": {"message", "type", "param", "code"}}``, and is raised before any
generation starts: a request can be refused, never run a replica out of time
or memory.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_qlora.data.formats import TOOL_NAME as TOOL_NAME_RE
from ray_qlora.serve.tools import ToolMode, call_schema, strict_tag, wants_strict
from ray_qlora.structured import GrammarKind

GrammarSpec = tuple[GrammarKind, str]  # what generation is held to, as text: the grammar cache's key

__all__ = [
    "MAX_CHOICES",
    "APIError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "Limits",
    "ResponseFormat",
    "chat_logprobs",
    "check_budget",
    "check_choices",
    "check_logit_bias",
    "check_model",
    "check_response_format",
    "check_tools",
    "chunk_body",
    "completion_body",
    "make_app",
    "models_body",
    "sse",
    "text_completion_body",
    "text_logprobs",
]

OPEN_PATHS = ("/health", "/health/live", "/health/ready")  # probes never need a key


class APIError(Exception):
    """An error to send back as an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.type, "param": self.param, "code": self.code}})


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str = ""

    @field_validator("type")
    @classmethod
    def _text_only(cls, v: str) -> str:
        if v != "text":
            raise ValueError(f"content parts of type {v!r} are not supported; send text parts")
        return v


TOOL_NAME = TOOL_NAME_RE.pattern  # OpenAI's rule for function names: the one training data is held to


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class CalledFunction(FunctionName):
    arguments: str  # JSON text, as OpenAI sends it back


class ToolCall(BaseModel):
    """A call the assistant made earlier in the conversation (sent back by the client with the tool's result)."""

    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction

    def as_dict(self) -> dict[str, Any]:
        """Arguments as an object: chat templates write them with ``tojson`` (vLLM passes them the same way)."""
        try:
            arguments = json.loads(self.function.arguments)
        except ValueError:
            raise ValueError(f"tool call {self.id!r}: function.arguments is not JSON") from None
        return {"id": self.id, "type": "function",
                "function": {"name": self.function.name, "arguments": arguments}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _join_parts(cls, v: Union[str, list[TextPart], None]) -> str | None:
        # A list of text parts means their texts one after another (as OpenAI and vLLM read it).
        return v if v is None or isinstance(v, str) else "\n".join(p.text for p in v)

    @model_validator(mode="after")
    def _complete(self) -> "ChatMessage":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may leave it out)")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id: the id of the call it answers")
        return self

    def as_dict(self) -> dict[str, Any]:
        """For the chat template: 'developer' is OpenAI's newer name for 'system'."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": self.content or ""}
        if self.tool_calls:
            out["tool_calls"] = [c.as_dict() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


def _stop_list(v: Union[str, list[str], None]) -> list[str]:
    stops = [v] if isinstance(v, str) else list(v or [])
    if len(stops) > 4:
        raise ValueError("at most 4 stop sequences")
    if any(not s for s in stops):
        raise ValueError("stop sequences must be non-empty strings")
    return stops


MAX_SCHEMA_DEPTH = 64  # nested objects and lists; a grammar's compile time grows fast with depth (~35 s at 900)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=64)
    # aliased: 'schema' would shadow BaseModel's method
    json_schema: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None

    @field_validator("json_schema")
    @classmethod
    def _not_too_deep(cls, v: dict[str, Any]) -> dict[str, Any]:
        # refused before compiling: one request must not hold a replica's CPU for minutes
        if _depth(v) > MAX_SCHEMA_DEPTH:
            raise ValueError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        return v


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON that follows a schema."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_asked(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs json_schema: {name, schema}")
        return self

    def schema_text(self) -> str | None:
        """The JSON schema generation must follow, as text (the grammar cache's key), or None.

        Keys keep the client's order: the grammar writes an object's properties in the order the
        schema lists them, and a model tuned on {"drug", "dose_mg", ...} should not be made to
        answer in alphabetical order.
        """
        if self.type == "json_object":
            return '{"type": "object"}'
        if self.type == "json_schema" and self.json_schema is not None:
            return json.dumps(self.json_schema.json_schema)
        return None


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _not_too_deep(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and _depth(v) > MAX_SCHEMA_DEPTH:
            raise ValueError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        return v


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionName


# OpenAI fields this server cannot honour, with the value that asks for nothing. A request that sets one
# gets a 400 instead of an answer that silently ignored it (a client asking for functions would get plain text).
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "functions": lambda v: not v,  # the deprecated form of tools
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: not v,
}


MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for (vLLM's default max_logprobs too)
MAX_CHOICES = 16  # n: one request's choices are one generate call, rows x max_tokens of work
COUNTED_LOGPROBS = (f"on /v1/completions logprobs is a count (0 to {MAX_TOP_LOGPROBS}): the alternatives to give "
                    "per token")


class _Sampling(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    response_format: ResponseFormat | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys are token ids (integers, as strings); got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"a bias is between -100 and 100; token {key} has {bias}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _refuse_what_is_not_honoured(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, harmless in _UNSUPPORTED.items():
                if name in data and not harmless(data[name]):
                    # an APIError, not a ValueError: pydantic would drop the field's name from the error
                    raise APIError(400, f"{name} is not supported by serve.engine: transformers; leave it out",
                                   name, code="unsupported_parameter")
        return data

    @model_validator(mode="after")
    def _choices_whole(self) -> "_Sampling":
        check_choices(self.n)
        if self.n > 1 and self.stream:
            # streamed generation here runs one row at a time (transformers' streamer takes batch 1)
            raise APIError(400, "n > 1 with stream: true is not supported by serve.engine: transformers; "
                                "use stream: false, or one streamed request per choice", "n",
                           code="unsupported_parameter")
        return self

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Union[str, list[str], None]) -> list[str]:
        return _stop_list(v)

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])

    def requested_tokens(self, default: int) -> int:
        return self.max_tokens or default

    @property
    def schema_text(self) -> str | None:
        """The JSON schema the answer must follow (response_format), or None for free text."""
        return self.response_format.schema_text() if self.response_format else None

    def grammar_spec(self, strict_default: bool = False, hermes: bool = True) -> GrammarSpec | None:
        """What generation is held to (None: free text). The arguments matter for chat requests with tools."""
        text = self.schema_text
        return ("json_schema", text) if text is not None else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def logprob_top(self) -> int | None:
        """None for no logprobs; else how many alternatives to give per token."""
        return None

    @property
    def bias_items(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as sorted (token id, bias) pairs: hashable, so equal requests batch together."""
        return tuple(sorted((int(k), float(b)) for k, b in (self.logit_bias or {}).items() if b))


class ChatCompletionRequest(_Sampling):
    """The subset of OpenAI's chat request that this server honours; other fields are ignored."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return self

    @model_validator(mode="after")
    def _tools_consistent(self) -> "ChatCompletionRequest":
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise APIError(400, f"tools: function names must be unique; got {names}", "tools")
        mode = self.tool_mode
        if mode in ("required", "named") and not names:
            raise APIError(400, f"tool_choice {self.tool_choice_name or mode!r} needs tools to call", "tool_choice")
        if mode == "named" and self.tool_choice_name not in names:
            raise APIError(400, f"tool_choice names {self.tool_choice_name!r}, which is not among tools {names}",
                           "tool_choice")
        try:
            self.schema_text  # noqa: B018 - built here so a tools list that cannot make one is a 400, not a 500
        except ValueError as err:
            raise APIError(400, f"tools: {err}", "tools", code="invalid_json_schema") from None
        if mode in ("required", "named") and self.response_format and self.response_format.type != "text":
            # both would set the grammar the answer follows: a call's arguments, or the response's JSON
            raise APIError(400, "response_format cannot be combined with a forced tool_choice; the call's "
                                "arguments already follow the function's parameters", "response_format")
        return self

    @property
    def tool_mode(self) -> ToolMode:
        """How this request uses tools: OpenAI's default is 'auto' when tools are sent, else 'none'."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        return self.tool_choice if self.tools or self.tool_choice != "auto" else "none"

    @property
    def tool_choice_name(self) -> str | None:
        return self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None

    @property
    def functions(self) -> list[dict[str, Any]]:
        """The offered functions as plain dicts (what chat templates and the call schemas read)."""
        return [t.function.model_dump(exclude_none=True) for t in self.tools or []]

    @property
    def schema_text(self) -> str | None:
        """A forced tool call's schema, else response_format's (None for free text)."""
        schema = call_schema(self.functions, self.tool_mode, self.tool_choice_name, self.parallel_tool_calls)
        return json.dumps(schema) if schema is not None else super().schema_text

    def grammar_spec(self, strict_default: bool = False, hermes: bool = True) -> GrammarSpec | None:
        """A forced call's or response_format's JSON schema; else, under a strict 'auto', the structural tag
        that holds calls to the tools' schemas once the model opens one; else None (free text).

        ``strict_default``: serve.strict_tools. ``hermes``: whether this model's calls are read as Hermes
        tags; calls in a model's own format (its response_template) cannot be held this way and stay free.
        A JSON response_format wins over a strict 'auto': the answer is held to it, as without tools.
        """
        spec = super().grammar_spec()
        if spec is None and self.tool_mode == "auto" and hermes and wants_strict(self.functions, strict_default):
            return "structural_tag", json.dumps(strict_tag(self.functions, self.parallel_tool_calls))
        return spec

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates take them (a template that writes tools shows them to the model).

        Without ``strict``: it says how the call is decoded, not what the function is, and training rows
        carry no such key (data/formats.py), so a strict request is shown the tools as training showed them.
        """
        return [{"type": "function", "function": {k: v for k, v in f.items() if k != "strict"}}
                for f in self.functions] or None

    @property
    def logprob_top(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if v[-1].role == "assistant":
            raise ValueError("the last message must be from the user (or system, or a tool result), not the assistant")
        return v

    def requested_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def conversation(self) -> list[dict[str, Any]]:
        try:
            return [m.as_dict() for m in self.messages]
        except ValueError as err:
            raise APIError(400, f"messages: {err}", "messages") from None


class CompletionRequest(_Sampling):
    """OpenAI's legacy text completion: a raw prompt, no chat template."""

    prompt: Union[str, list[str]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions
    echo: bool = False
    # the legacy API's logprobs is a count: 0 gives each token's own logprob, N adds N alternatives
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("logprobs", mode="before")
    @classmethod
    def _a_count(cls, v: Any) -> Any:
        if isinstance(v, bool):  # chat's logprobs: true, sent here, would otherwise be read as 1
            raise ValueError(COUNTED_LOGPROBS)
        return v

    @property
    def logprob_top(self) -> int | None:
        return self.logprobs

    @model_validator(mode="before")
    @classmethod
    def _no_tools(cls, data: Any) -> Any:
        for name in ("tools", "tool_choice"):
            if isinstance(data, dict) and data.get(name):
                raise APIError(400, f"{name} is for chat: send it to /v1/chat/completions", name,
                               code="unsupported_parameter")
        return data

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Union[str, list[str]]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("send one prompt per request (a list of exactly one string)")
            v = v[0]
        if not v:
            raise ValueError("the prompt is empty")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v


def schema_error(err: Exception, param: str = "response_format") -> APIError:
    """The 400 for a response_format (or tool parameters) schema that structured.SchemaError refused."""
    code = "unsupported_parameter" if getattr(err, "missing_library", False) else "invalid_json_schema"
    return APIError(400, f"{param}: {err}", param, code=code)


def check_response_format(raw: Any) -> None:
    """A 400 in OpenAI's shape unless ``raw`` is a response_format whose schema a grammar can follow.

    For the vLLM engine, before the request reaches it: vLLM refuses a bad schema too, but with
    internal exception names in the message and no ``param``. The transformers engine checks the
    same way when it compiles the schema.
    """
    from ray_qlora.structured import SchemaError, check_followable

    try:
        fmt = ResponseFormat.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(["response_format", *(str(p) for p in first["loc"])])
        raise APIError(400, f"{loc}: {first['msg'].removeprefix('Value error, ')}", loc) from None
    text = fmt.schema_text()
    if text is not None:
        try:
            check_followable(json.loads(text))
        except SchemaError as err:
            raise schema_error(err) from None


def check_tools(body: dict[str, Any]) -> "ChatCompletionRequest | None":
    """For the vLLM engine: a 400 in the transformers engine's words for tools it would refuse.

    The same request rules (ChatCompletionRequest's), and every function's parameters a schema a grammar
    can follow (vLLM's own refusals name internal exceptions and no ``param``). Returns the request's tool
    fields (and response_format) parsed, None without tools. Run after check_response_format, which names
    response_format's own fields.
    """
    from ray_qlora.structured import SchemaError, check_followable

    if not body.get("tools") and not body.get("tool_choice"):
        return None
    fields = {k: body[k] for k in ("tools", "tool_choice", "parallel_tool_calls", "response_format")
              if body.get(k) is not None}
    try:
        req = ChatCompletionRequest.model_validate({**fields, "model": "m",
                                                    "messages": [{"role": "user", "content": ""}]})
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(_sent_fields(first["loc"]))
        raise APIError(400, f"{loc}: {first['msg'].removeprefix('Value error, ')}", loc) from None
    for function in req.functions:
        try:
            check_followable(function.get("parameters") or {"type": "object"})
        except SchemaError as err:
            raise schema_error(err, "tools") from None
    return req


def check_choices(n: int) -> None:
    """A 400 for more choices than one request may ask for (both engines: a request's work stays bounded)."""
    if n > MAX_CHOICES:
        raise APIError(400, f"n is {n}, above this server's limit of {MAX_CHOICES} choices per request", "n",
                       code="too_many_choices")


def check_logit_bias(items: tuple[tuple[int, float], ...], vocab_size: int) -> None:
    """A 400 naming the first logit_bias key that is not a token of this model."""
    for token, _ in items:
        if token >= vocab_size:
            raise APIError(400, f"logit_bias: token {token} is not in this model's vocabulary (0 to {vocab_size - 1})",
                           "logit_bias", code="invalid_logit_bias")


def check_model(requested: str, served: str) -> None:
    """404 in OpenAI's words unless the request names the served model."""
    if requested != served:
        raise APIError(404, f"The model {requested!r} does not exist; GET /v1/models lists {served!r}",
                       "model", code="model_not_found")


def check_budget(prompt_tokens: int, requested: int, max_tokens: int, context: int, param: str) -> int:
    """The completion budget, or a 400 naming the limit and the value that broke it.

    A request may ask for at most ``max_tokens`` (serve.max_new_tokens), and
    its prompt plus that budget must fit the model's context.
    """
    if requested > max_tokens:
        raise APIError(400, f"{param} is {requested}, above this server's limit of {max_tokens} "
                            "(serve.max_new_tokens)", param, code="max_tokens_exceeded")
    if prompt_tokens + requested > context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} for "
                            "the completion). Please reduce the prompt or the completion length.",
                       "messages", code="context_length_exceeded")
    return requested


def models_body(model_name: str, created: int, adapters: list[str] | None = None) -> dict[str, Any]:
    """The merged model first, then the registry's adapters (each served on the merged model's base)."""
    data = [{"id": model_name, "object": "model", "created": created, "owned_by": "ray-qlora"}]
    data += [{"id": name, "object": "model", "created": created, "owned_by": "ray-qlora", "parent": model_name}
             for name in adapters or []]
    return {"object": "list", "data": data}


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def _finite(logprob: float) -> float:
    return max(logprob, -9999.0)  # JSON has no -Infinity (a token the model gives no chance at all)


def chat_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """generation's per-token entries in the chat API's shape ({"content": [...]}), or None if not asked."""
    if entries is None:
        return None
    return {"content": [{"token": e["token"], "logprob": _finite(e["logprob"]), "bytes": _bytes(e["token"]),
                         "top_logprobs": [{"token": t, "logprob": _finite(v), "bytes": _bytes(t)} for t, v in e["top"]]}
                        for e in entries],
            "refusal": None}


def text_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The same in the legacy completions shape: parallel lists, offsets into the completion's text."""
    if entries is None:
        return None
    alternatives = any(e["top"] for e in entries)
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [_finite(e["logprob"]) for e in entries],
            "top_logprobs": [{t: _finite(v) for t, v in e["top"]} for e in entries] if alternatives else None,
            "text_offset": [e["offset"] for e in entries]}


def _usage(outs: list[dict[str, Any]]) -> dict[str, int]:
    """The prompt once (every choice shares it), the completion tokens of all choices."""
    prompt, completion = outs[0]["prompt_tokens"], sum(o["completion_tokens"] for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _message(out: dict[str, Any]) -> dict[str, Any]:
    """The assistant message of one answer: its text, and its tool calls when it made any (tools.read_calls)."""
    message: dict[str, Any] = {"role": "assistant", "content": out["text"]}
    if out.get("tool_calls"):
        message["tool_calls"] = out["tool_calls"]
    return message


def completion_body(model_name: str, outs: list[dict[str, Any]]) -> dict[str, Any]:
    """A chat completion with one choice per generated answer (``n`` of them)."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [{"index": i, "message": _message(out), "finish_reason": out["finish_reason"],
                     "logprobs": chat_logprobs(out.get("logprobs"))} for i, out in enumerate(outs)],
        "usage": _usage(outs),
    }


def text_completion_body(model_name: str, outs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [{"index": i, "text": out["text"], "finish_reason": out["finish_reason"],
                     "logprobs": text_logprobs(out.get("logprobs"))} for i, out in enumerate(outs)],
        "usage": _usage(outs),
    }


def chunk_body(kind: Literal["chat", "text"], rid: str, model_name: str, text: str | None,
               finish_reason: str | None = None, usage: dict[str, int] | None = None,
               first: bool = False, logprobs: list[dict[str, Any]] | None = None,
               tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One streamed chunk; a usage-only chunk has empty choices (stream_options.include_usage).

    ``logprobs``: generation's entries for the tokens whose text this chunk carries (None if not asked).
    ``tool_calls``: whole calls, each delta'd with its index as OpenAI streams them (chat only).
    """
    created = int(time.time())
    if kind == "text":
        choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": finish_reason,
                                             "logprobs": text_logprobs(logprobs)}]
        body = {"id": rid, "object": "text_completion", "created": created, "model": model_name, "choices": choices}
    else:
        delta: dict[str, Any] = {} if text is None and not first else {"content": text or ""}
        if first:
            delta["role"] = "assistant"
        if tool_calls:
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(tool_calls)]
        choices = [] if text is None and finish_reason is None and not first and not tool_calls else [
            {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": chat_logprobs(logprobs)}]
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def sse(body: dict[str, Any] | str) -> str:
    """A server-sent event line as OpenAI streams them (``data: {...}`` then ``data: [DONE]``)."""
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


def _sent_fields(loc: Any) -> list[str]:
    """A pydantic error's location as the fields a client sent.

    An error inside a union carries its branch names (str, list[...], literal[...], a model's class name)
    and FastAPI adds 'body'; OpenAI's own fields are all snake_case.
    """
    parts = [str(p) for p in loc if p != "body"]
    return [p for p in parts if p != "str" and not p.startswith(("list[", "literal[", "function-"))
            and not p[:1].isupper()]


def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    # A field with alternatives (content: a string or a list of parts) fails once per alternative;
    # the deepest error is the one about what the client actually sent.
    first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {"loc": (), "msg": "invalid request"}
    loc = _sent_fields(first.get("loc", ()))
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        msg = "the request body is not valid JSON"
    return APIError(400, f"{'.'.join(loc) + ': ' if loc else ''}{msg}", ".".join(loc) or None).response()


def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return APIError(exc.status_code, str(exc.detail), code=code).response()


@dataclass
class Limits:
    """What the middleware enforces; a replica fills it in from the config when it starts."""

    max_body_bytes: int = 1 << 20
    # seconds one read of the body may wait; a request Ray Serve re-routes after its replica died mid-read
    # finds the body already taken and would otherwise wait forever (408 lets the client resend it)
    body_timeout_s: float = 30.0
    api_keys: list[str] | None = None  # None: no key needed (serve.auth: none)
    # called once per finished response: (path, HTTP status, seconds to the response's start)
    on_response: Callable[[str, int, float], None] | None = None


class _BodyTooLarge(Exception):
    def __init__(self, size: int, more: bool) -> None:
        self.size, self.more = size, more


class _BodyStalled(Exception):
    """No part of the body came within the timeout."""


async def read_body(receive: Callable, max_bytes: int | None = None, timeout_s: float | None = None) -> bytes:
    """An ASGI request's whole body.

    Past ``max_bytes`` it stops reading and raises _BodyTooLarge; a read that waits over ``timeout_s``
    raises _BodyStalled.
    """
    body, more = b"", True
    while more:
        try:
            message = await asyncio.wait_for(receive(), timeout_s)
        except asyncio.TimeoutError:
            raise _BodyStalled() from None
        if message["type"] != "http.request":
            break
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if max_bytes is not None and len(body) > max_bytes:
            raise _BodyTooLarge(len(body), more)
    return body


def replaying(body: bytes, receive: Callable) -> Callable:
    """An ASGI receive that gives ``body`` (already read) once, then whatever ``receive`` gives (disconnects)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class _LimitsMiddleware:
    """ASGI middleware: the API key, then the body size (counted as it arrives).

    Pure ASGI rather than an HTTP middleware so a body over the limit is
    refused while it streams in, not after it has been read into memory.
    """

    def __init__(self, app: Any, limits: Limits | Callable[[], Limits]) -> None:
        self.app, self._limits = app, limits

    @property
    def limits(self) -> Limits:
        # a callable is asked on every request: an app pickled to a replica still sees what it set at start
        return self._limits() if callable(self._limits) else self._limits

    @property
    def max_body_bytes(self) -> int:
        return self.limits.max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        observe = self.limits.on_response
        if observe is None:
            return await self._checked(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_observed(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                observe(scope.get("path", ""), status[0], time.perf_counter() - started)
            await send(message)

        await self._checked(scope, receive, send_observed)

    async def _checked(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if not path.endswith(OPEN_PATHS):
            refused = self._auth_error(dict(scope.get("headers") or []))
            if refused is not None:
                return await refused.response()(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._too_large(int(declared)).response()(scope, receive, send)
        try:  # read it all (bounded in size and time), then hand it on
            body = await read_body(receive, self.max_body_bytes, self.limits.body_timeout_s)
        except _BodyTooLarge as big:
            return await self._too_large(big.size, at_least=big.more).response()(scope, receive, send)
        except _BodyStalled:
            stalled = APIError(408, f"the request body did not arrive within {self.limits.body_timeout_s:g} s "
                                    "(serve.body_timeout_s); send the request again", None, code="request_timeout")
            return await stalled.response()(scope, receive, send)
        await self.app(scope, replaying(body, receive), send)

    def _too_large(self, size: int, at_least: bool = False) -> APIError:
        return APIError(400, f"request body is {'over ' if at_least else ''}{size} bytes, above this server's "
                             f"limit of {self.max_body_bytes} (serve.max_body_bytes)", None,
                        code="request_too_large")

    def _auth_error(self, headers: dict[bytes, bytes]) -> APIError | None:
        keys = self.limits.api_keys
        if keys is None:  # serve.auth: none, set on purpose
            return None
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return APIError(401, "You didn't provide an API key: send it as 'Authorization: Bearer <key>'",
                            None, code="invalid_api_key")
        # compare against every key in constant time (no early exit that times which one matched)
        matched = False
        for key in keys:
            matched |= hmac.compare_digest(token.strip().encode(), key.encode())
        if not matched:
            return APIError(401, "Incorrect API key provided", None, code="invalid_api_key")
        return None


def make_app(limits: Limits | None = None) -> FastAPI:
    """A FastAPI app whose errors all come back in OpenAI's shape, with body-size and API-key checks.

    ``limits`` is read on every request, so a replica can set it once its config is known.
    """
    app = FastAPI(title="ray-qlora", docs_url=None, redoc_url=None)
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(APIError, lambda _r, e: e.response())  # type: ignore[arg-type,return-value]
    app.add_middleware(_LimitsMiddleware, limits=limits if limits is not None else Limits())
    return app
