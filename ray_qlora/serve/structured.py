"""Structured output for the transformers engine: response_format's JSON schema as a grammar on the logits.

xgrammar (the library vLLM itself uses for this) compiles a schema against
the tokenizer's vocabulary; during generation it masks every token that
would break the schema, so the answer parses whatever the model's weights
say. The vLLM engine does the same inside vLLM.

JSON is generated without free whitespace (``{"a": 1}``, never
``{ "a" :1 }``): a grammar that allows any whitespace lets a small model
spend its whole budget on newlines between two braces.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from ray_qlora.serve.api import APIError

__all__ = ["Grammars"]

# xgrammar's errors start with a C++ log prefix: "[07:34:42] /project/cpp/json_schema_converter.cc:5082: ..."
_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\s+\S+:\d+:\s*")


class Grammars:
    """Compiles (and caches) response-format schemas for one tokenizer and model vocabulary."""

    def __init__(self, tok: Any, vocab_size: int, cache_size: int = 64) -> None:
        self.tok, self.vocab_size = tok, vocab_size
        self._compiler: Any = None
        self.compile = lru_cache(maxsize=cache_size)(self._compile)  # type: ignore[method-assign]

    def _compiler_for_tokenizer(self) -> Any:
        if self._compiler is None:
            try:
                import xgrammar as xgr
            except ImportError:
                raise APIError(400, "response_format needs xgrammar on the server (pip install "
                                    "'ray-qlora[structured]'); leave response_format out", "response_format",
                               code="unsupported_parameter") from None
            # the model's vocabulary can be larger than the tokenizer's (padded embeddings): logits are that wide
            info = xgr.TokenizerInfo.from_huggingface(self.tok, vocab_size=self.vocab_size)
            self._compiler = xgr.GrammarCompiler(info)
        return self._compiler

    def _compile(self, schema_text: str) -> Any:
        """The compiled grammar for a JSON schema's text; a 400 naming response_format if it is not usable."""
        compiler = self._compiler_for_tokenizer()
        try:
            return compiler.compile_json_schema(schema_text, any_whitespace=False)
        except (RuntimeError, ValueError) as err:
            reason = _LOG_PREFIX.sub("", str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
            raise APIError(400, f"response_format.json_schema.schema cannot be followed: {reason}",
                           "response_format", code="invalid_json_schema") from None
