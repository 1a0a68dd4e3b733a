"""Structured output: a JSON schema as a grammar on the logits, for serve's response_format and eval.constrained.

xgrammar (the library vLLM itself uses for this) compiles a schema against
the tokenizer's vocabulary; during generation it masks every token that
would break the schema, so the answer parses whatever the model's weights
say. The vLLM engine does the same inside vLLM.

JSON is generated without free whitespace (``{"a": 1}``, never
``{ "a" :1 }``): a grammar that allows any whitespace lets a small model
spend its whole budget on newlines between two braces.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any, Literal

from ray_qlora.config import ConfigError

__all__ = ["GrammarKind", "Grammars", "SchemaError", "check_followable", "check_installed"]

GrammarKind = Literal["json_schema", "structural_tag"]

# xgrammar's errors start with a C++ log prefix: "[07:34:42] /project/cpp/json_schema_converter.cc:5082: ..."
_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\s+\S+:\d+:\s*")
INSTALL_HINT = "pip install 'ray-qlora[structured]'"


class SchemaError(ValueError):
    """A schema generation cannot follow; ``missing_library`` when xgrammar is not installed at all."""

    def __init__(self, message: str, missing_library: bool = False) -> None:
        super().__init__(message)
        self.missing_library = missing_library


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise SchemaError(f"structured output needs xgrammar ({INSTALL_HINT})", missing_library=True) from None
    return xgrammar


def check_installed(key: str, needs: str) -> None:
    """A ConfigError naming the boolean config ``key`` that ``needs`` xgrammar, unless it can be imported here."""
    try:
        _xgrammar()
    except SchemaError as err:
        raise ConfigError(f"invalid config: {key}: {needs}, and {err}; install it, or set {key}: false") from None


def _reason(err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return _LOG_PREFIX.sub("", first)


def check_followable(schema: dict[str, Any]) -> None:
    """A SchemaError unless xgrammar can turn ``schema`` into a grammar (no tokenizer needed)."""
    xgr = _xgrammar()
    try:
        xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    except (RuntimeError, ValueError) as err:
        raise SchemaError(f"the JSON schema cannot be followed: {_reason(err)}") from None


class Grammars:
    """Compiles (and caches) JSON schemas for one tokenizer and model vocabulary."""

    def __init__(self, tok: Any, vocab_size: int, cache_size: int = 64) -> None:
        self.tok, self.vocab_size = tok, vocab_size
        self._compiler: Any = None
        self.compile = lru_cache(maxsize=cache_size)(self._compile)  # type: ignore[method-assign]

    def _compile(self, schema_text: str, kind: GrammarKind = "json_schema") -> Any:
        """The compiled grammar for a JSON schema's text (or, kind 'structural_tag', an xgrammar structural
        tag's: free text with tagged parts under schemas, as strict tool calls); a SchemaError if it
        cannot be followed."""
        if self._compiler is None:
            xgr = _xgrammar()
            # the model's vocabulary can be larger than the tokenizer's (padded embeddings): logits are that wide
            self._compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(self.tok,
                                                                                    vocab_size=self.vocab_size))
        try:
            if kind == "structural_tag":
                return self._compiler.compile_structural_tag(schema_text)
            return self._compiler.compile_json_schema(schema_text, any_whitespace=False)
        except (RuntimeError, ValueError) as err:
            raise SchemaError(f"the JSON schema cannot be followed: {_reason(err)}") from None
