"""Many LoRA adapters from the registry on one shared 16-bit base, per replica.

The base is loaded once (on the first adapter request) and wrapped by peft;
each adapter is added to it under its registry name and removed again when
Serve's multiplexing LRU (``serve.multiplexed``, sized by serve.max_adapters)
evicts it, so memory is base + N x adapter and loading an adapter never
reloads the base. peft switches adapters per call (``set_adapter``), so
generation through adapters is serialised by a lock; the merged model,
which most traffic uses, is not affected by it.

Adapter names come from requests: they are checked against the registry's
name pattern and must exist there (see ray_qlora/adapters.py), and an
adapter trained on another base (by content hash) is refused.
"""

from __future__ import annotations

import itertools
import logging
import threading
from pathlib import Path
from typing import Any, Iterator

from ray_qlora import adapters, storage
from ray_qlora.config import PipelineConfig
from ray_qlora.serve.api import APIError

__all__ = ["AdapterEngine", "LoadedAdapter", "parse_model_id"]

log = logging.getLogger(__name__)


def parse_model_id(model_id: str) -> tuple[str, str | None]:
    """'name' or 'name@v3' -> (name, version or None); a 404 unless it could be a registry name."""
    name, _, version = model_id.partition("@")
    try:
        adapters.check_name(name)
        if version:
            adapters._check_version(version)
    except adapters.AdapterError:
        raise APIError(404, f"The model {model_id!r} does not exist", "model", code="model_not_found") from None
    return name, version or None


class LoadedAdapter:
    """What the multiplexing LRU holds; Serve calls ``__del__`` when it evicts it, which unloads it."""

    def __init__(self, engine: "AdapterEngine", key: str, token: int) -> None:
        self.engine, self.key, self.token = engine, key, token

    def __del__(self) -> None:
        self.engine.unload(self.key, self.token)


class AdapterEngine:
    """The shared base and the adapters loaded into it."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.model: Any = None  # a PeftModel once the first adapter is loaded
        self.tok: Any = None
        self.templates: dict[str, str | dict[str, str]] = {}  # key -> the template(s) the adapter was trained with
        self.lock = threading.Lock()  # one adapter active at a time on the shared base
        self.tokens: dict[str, int] = {}  # key -> load token: a stale eviction never unloads a newer load
        self._next = itertools.count(1)
        self.grammars: Any = None  # ray_qlora.structured.Grammars for the base's tokenizer, made on first use

    def _base(self) -> tuple[Any, Path]:
        from ray_qlora.generation import inference_dtype
        from ray_qlora.modeling import load_16bit, load_tokenizer, pick_device, resolve_base

        path = resolve_base(self.cfg.model, self.cfg.storage)
        if self.tok is None:
            self.tok = load_tokenizer(path, self.cfg.data.chat_template,
                                      trust_remote_code=self.cfg.model.trust_remote_code)
        device = pick_device()
        return load_16bit(path, inference_dtype(self.cfg.merge.dtype, device), device,
                          self.cfg.model.trust_remote_code), path

    def load(self, model_id: str) -> LoadedAdapter:
        """Load ``name[@vN]`` from the registry into the shared base (blocking; run it in a thread)."""
        from peft import PeftModel

        from ray_qlora.modeling import base_fingerprint, resolve_base

        name, version = parse_model_id(model_id)
        try:
            meta = adapters.show(self.cfg, name, version)
        except adapters.AdapterError:
            raise APIError(404, f"The model {model_id!r} does not exist; GET /v1/models lists what is served",
                           "model", code="model_not_found") from None
        base_path = resolve_base(self.cfg.model, self.cfg.storage)
        wanted = (meta.get("base_model") or {}).get("sha256")
        if wanted and wanted != base_fingerprint(base_path):
            raise APIError(400, f"adapter {model_id!r} was trained on another base model "
                                f"({meta['base_model'].get('ref')}); this server's base is {self.cfg.model.base}",
                           "model", code="adapter_base_mismatch")
        names = {Path(u).name for u in storage.list_files(meta["uri"], self.cfg.storage)}
        adapters.check_adapter_files(names, self.cfg.model.allow_pickle, meta["uri"])
        local = storage.copy_dir_from(meta["uri"], None, self.cfg.storage)
        key = model_id
        with self.lock:
            if self.model is None:
                base, _ = self._base()
                self.model = PeftModel.from_pretrained(base, str(local), adapter_name=key)
                self.model.eval()
            elif key not in self.model.peft_config:
                self.model.load_adapter(str(local), adapter_name=key)
            token = next(self._next)
            self.tokens[key] = token
        self.templates[key] = adapters.read_templates(self.cfg, str(local)) or self.tok.chat_template
        log.info("adapters: loaded %s (%s/%s) into the shared base", model_id, name, meta["version"])
        return LoadedAdapter(self, key, token)

    def unload(self, key: str, token: int) -> None:
        """Drop an adapter from the base (an LRU eviction); a no-op if a newer load of it replaced this one."""
        with self.lock:
            if self.model is None or self.tokens.get(key) != token or key not in self.model.peft_config:
                return
            del self.tokens[key]
            # every generation sets its adapter first, so deleting the active (or the last) one is safe
            self.model.delete_adapter(key)
            self.templates.pop(key, None)
        log.info("adapters: unloaded %s", key)

    def loaded(self) -> list[str]:
        return sorted(self.tokens)

    def render(self, key: str, conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        from ray_qlora.data.templating import pick_template

        return self.tok.apply_chat_template(conversation, chat_template=pick_template(self.templates[key], tools),
                                            tools=tools, tokenize=False, add_generation_prompt=True)

    def generate(self, key: str, prompts: list[str], *args: Any) -> list[dict[str, Any]]:
        from ray_qlora.generation import generate_text

        with self.lock:
            self.model.set_adapter(key)
            return generate_text(self.model, self.tok, prompts, *args)

    def stream(self, key: str, prompt: str, *args: Any) -> Iterator[dict[str, Any]]:
        """Streamed generation through one adapter; holds the lock until the stream ends."""
        from ray_qlora.generation import stream_text

        with self.lock:
            self.model.set_adapter(key)
            yield from stream_text(self.model, self.tok, prompt, *args)

    def memory(self) -> dict[str, Any]:
        """Bytes of the shared base and of each loaded adapter's LoRA weights (what N adapters cost)."""
        if self.model is None:
            return {"base_bytes": 0, "adapters": {}, "total_bytes": 0}
        per: dict[str, int] = {k: 0 for k in self.model.peft_config}
        base = 0
        for name, p in self.model.named_parameters():
            owner = next((k for k in per if f".{k}." in name or name.endswith(f".{k}")), None)
            if owner is None:
                base += p.numel() * p.element_size()
            else:
                per[owner] += p.numel() * p.element_size()
        return {"base_bytes": base, "adapters": per, "total_bytes": base + sum(per.values())}
