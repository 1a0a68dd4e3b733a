"""The adapter registry: trained LoRA adapters as named, versioned artefacts.

Layout, under the run's output URI (object storage or a folder)::

    <output_uri>/adapters/<name>/<version>/   version = v1, v2, ...
        adapter_config.json          peft's config (r, alpha, targets, base reference)
        adapter_model.safetensors    the LoRA weights (never a pickle)
        chat_template.jinja          the template the adapter was trained with (named templates: the
        additional_chat_templates/   default there, the others here, as transformers saves them)
        Modelfile                    Ollama: FROM the base + ADAPTER this folder
        metadata.json                written last: a version without it is not listed

A folder holding exactly what vLLM's ``--lora-modules`` and peft's
``from_pretrained`` read, so serving loads an adapter straight from its
version folder. ``metadata.json`` says what the adapter needs and where it
came from: the base model (reference and content hash: an adapter only fits
the base it was trained on), the LoRA shape, the run, trial and data manifest
hash, and the trial's metrics.

Names are checked against one pattern (config.ADAPTER_NAME): nothing that
could be a path or a URI ever reaches a storage call.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from ray_qlora import storage
from ray_qlora.config import ADAPTER_NAME, ADAPTER_NAME_RULE, PipelineConfig
from ray_qlora.errors import UserError

__all__ = [
    "AdapterError",
    "check_adapter_files",
    "check_name",
    "delete",
    "format_list",
    "list_adapters",
    "publish",
    "publish_run",
    "registry_root",
    "resolve",
    "show",
]

log = logging.getLogger(__name__)

WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
METADATA = "metadata.json"
TEMPLATE_FILE, TEMPLATE_DIR = "chat_template.jinja", "additional_chat_templates"  # transformers' own names
_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_VERSION = re.compile(r"v([1-9][0-9]{0,8})")


class AdapterError(UserError, ValueError):
    """A bad adapter name or version, or one that is not in the registry."""


def registry_root(cfg: PipelineConfig) -> str:
    return storage.join(cfg.run.output_uri, "adapters")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(ADAPTER_NAME, name):
        raise AdapterError(f"adapter name {name!r} is not valid: {ADAPTER_NAME_RULE}")
    return name


def _check_version(version: str) -> int:
    m = _VERSION.fullmatch(version or "")
    if not m:
        raise AdapterError(f"adapter version {version!r} is not valid: write v1, v2, ...")
    return int(m.group(1))


def _versions(cfg: PipelineConfig, name: str) -> list[int]:
    """Published versions of ``name`` (those with metadata.json), oldest first."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(storage.join(registry_root(cfg), check_name(name)), cfg.storage)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    found = []
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        m = _VERSION.fullmatch(info.base_name)
        if m and fs.get_file_info(f"{info.path}/{METADATA}").type == pafs.FileType.File:
            found.append(int(m.group(1)))
    return sorted(found)


def check_adapter_files(names: set[str], allow_pickle: bool, where: str) -> str:
    """The weights file to read from an adapter folder; pickles only when the config allows them."""
    if ADAPTER_CONFIG not in names:
        raise AdapterError(f"{where}: no {ADAPTER_CONFIG}; not a peft LoRA adapter folder")
    if WEIGHTS in names:
        return WEIGHTS
    if PICKLED_WEIGHTS in names:
        if allow_pickle:
            return PICKLED_WEIGHTS
        raise AdapterError(f"{where}: the adapter is a pickle ({PICKLED_WEIGHTS}); loading one can run code. "
                           "Convert it to safetensors, or set model.allow_pickle: true if you trust it")
    raise AdapterError(f"{where}: no {WEIGHTS}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _lora_shape(adapter_config: dict[str, Any]) -> dict[str, Any]:
    targets = adapter_config.get("target_modules")
    return {"r": adapter_config.get("r"), "alpha": adapter_config.get("lora_alpha"),
            "dropout": adapter_config.get("lora_dropout"),
            "target_modules": sorted(targets) if isinstance(targets, list) else targets}


def _base_info(cfg: PipelineConfig) -> dict[str, Any]:
    from ray_qlora.modeling import base_fingerprint, resolve_base

    path = resolve_base(cfg.model, cfg.storage)
    info: dict[str, Any] = {"ref": cfg.model.base}
    if (path / "config.json").is_file():
        mc = json.loads((path / "config.json").read_text())
        info.update(sha256=base_fingerprint(path), model_type=mc.get("model_type"),
                    architectures=mc.get("architectures"))
    return info


def _chat_template(cfg: PipelineConfig) -> Any:
    """The tokenizer the adapter was trained with (its chat template goes along)."""
    from ray_qlora.modeling import load_tokenizer, resolve_base

    return load_tokenizer(resolve_base(cfg.model, cfg.storage), cfg.data.chat_template,
                          trust_remote_code=cfg.model.trust_remote_code)


def publish(cfg: PipelineConfig, adapter_uri: str, name: str, provenance: dict[str, Any],
            tokenizer: Any = None, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy an adapter into ``<registry>/<name>/v<N+1>/`` with its metadata; returns the metadata.

    ``provenance``: run_id, trial, params, metrics, data_manifest_sha256... as known to the caller.
    """
    check_name(name)
    files = {Path(u).name: u for u in storage.list_files(adapter_uri, cfg.storage)}
    weights = check_adapter_files(set(files), cfg.model.allow_pickle, adapter_uri)
    tok = tokenizer if tokenizer is not None else _chat_template(cfg)
    templates = template_files(tok.chat_template)  # a name that cannot be a file is refused before any write
    version = f"v{(_versions(cfg, name) or [0])[-1] + 1}"
    dest = storage.join(registry_root(cfg), name, version)
    hashes = {}
    for fname in (ADAPTER_CONFIG, weights):
        data = storage.read_bytes(files[fname], cfg.storage)
        hashes[fname] = _sha256(data)
        storage.write_bytes(storage.join(dest, fname), data, cfg.storage)
    adapter_config = json.loads(storage.read_bytes(files[ADAPTER_CONFIG], cfg.storage))
    for rel, text in templates.items():
        storage.write_bytes(storage.join(dest, rel), text.encode(), cfg.storage)
    if cfg.export.ollama:
        _write_adapter_modelfile(cfg, tok, dest)
    meta = {
        "name": name, "version": version, "uri": dest,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "format": "peft-lora",
        "base_model": base if base is not None else _base_info(cfg),
        "lora": _lora_shape(adapter_config),
        "chat_template_sha256": _sha256((templates[TEMPLATE_FILE] if len(templates) == 1
                                         else json.dumps(templates, sort_keys=True)).encode()),
        "files": hashes,
        "source_uri": adapter_uri,
        **provenance,
    }
    storage.write_json(storage.join(dest, METADATA), meta, cfg.storage)  # last: the version now exists
    log.info("adapters: published %s/%s from %s", name, version, adapter_uri)
    return meta


def template_files(template: str | dict[str, str] | None) -> dict[str, str]:
    """A tokenizer's chat template as the files transformers saves it in (relative path -> text).

    One template is chat_template.jinja. Named ones (a dict: some tokenizers ship 'default' and 'tool_use')
    put the default there and each other in additional_chat_templates/<name>.jinja.
    """
    if not isinstance(template, dict):
        return {TEMPLATE_FILE: template or ""}
    out = {}
    for name, text in template.items():
        if name == "default":
            out[TEMPLATE_FILE] = text
        elif _TEMPLATE_NAME.fullmatch(name):
            out[f"{TEMPLATE_DIR}/{name}.jinja"] = text
        else:  # the name becomes a file name: nothing that could leave the folder
            raise AdapterError(f"chat template name {name!r} is not a plain name ({_TEMPLATE_NAME.pattern})")
    return out


def read_templates(cfg: PipelineConfig, uri: str) -> str | dict[str, str] | None:
    """The chat template(s) an adapter version folder (a URI, or a local copy) holds: the inverse of
    template_files; None when it has none."""
    def text(file_uri: str) -> str:
        return storage.read_bytes(file_uri, cfg.storage).decode()

    main, extra = storage.join(uri, TEMPLATE_FILE), storage.join(uri, TEMPLATE_DIR)
    default = text(main) if storage.exists(main, cfg.storage) else None
    named = ({Path(u).stem: text(u) for u in storage.list_files(extra, cfg.storage, (".jinja",))}
             if storage.exists(extra, cfg.storage) else {})
    if not named:
        return default
    return {**({"default": default} if default is not None else {}), **named}


def _write_adapter_modelfile(cfg: PipelineConfig, tok: Any, dest: str) -> None:
    """Ollama Modelfile for the adapter alone: FROM the base, ADAPTER this folder."""
    from ray_qlora.export.ollama import adapter_modelfile
    from ray_qlora.modeling import resolve_base

    config = resolve_base(cfg.model, cfg.storage) / "config.json"
    context = json.loads(config.read_text()).get("max_position_embeddings", 2048) if config.is_file() else 2048
    try:
        text = adapter_modelfile(tok, base_ref=cfg.model.base, adapter_ref=".", num_ctx=min(int(context), 8192),
                                  system=cfg.data.system_prompt)
    except ValueError as err:  # a template Ollama cannot express: no Modelfile beats a wrong one
        log.warning("adapters: no Ollama Modelfile: %s", err)
        return
    storage.write_bytes(storage.join(dest, "Modelfile"), text.encode(), cfg.storage)


def publish_run(cfg: PipelineConfig, run: storage.RunPaths, run_id: str, tune_result: dict[str, Any],
                name: str | None = None, top_k: int | None = None) -> list[dict[str, str]]:
    """Publish a finished search's best adapter as ``name`` and runners-up as ``name-rank<k>``."""
    name = check_name(name or cfg.adapters.name or _name_from_run_id(run_id))
    top_k = top_k or cfg.adapters.top_k
    board = storage.read_json(tune_result["leaderboard_uri"], cfg.storage)
    ranked = [row for row in board if row.get("adapter_uri") and tune_result["metric"] in row][:top_k]
    if not ranked:  # a leaderboard from before adapter URIs were recorded: the best alone
        ranked = [{"trial": tune_result["best_trial"], "params": tune_result["best_params"],
                   "adapter_uri": tune_result["best_adapter_uri"],
                   tune_result["metric"]: tune_result["best_value"]}]
    manifest = storage.read_bytes(run.manifest, cfg.storage) if storage.exists(run.manifest, cfg.storage) else b""
    tok, base = _chat_template(cfg), _base_info(cfg)
    published = []
    for rank, row in enumerate(ranked, start=1):
        metrics = {k: row[k] for k in (tune_result["metric"], "best_eval_loss", "best_step") if k in row}
        meta = publish(cfg, row["adapter_uri"], name if rank == 1 else f"{name}-rank{rank}", {
            "run_id": run_id, "run_uri": run.root, "trial": row["trial"], "rank": rank,
            "params": row.get("params", {}), "metrics": metrics,
            "data_manifest_sha256": _sha256(manifest) if manifest else None,
        }, tokenizer=tok, base=base)
        published.append({"name": meta["name"], "version": meta["version"], "uri": meta["uri"]})
    return published


def _name_from_run_id(run_id: str) -> str:
    """A run id made into a valid adapter name (lower case, other characters to '-')."""
    name = re.sub(r"[^a-z0-9_-]+", "-", run_id.lower()).strip("-_")[:63]
    return name or "adapter"


def _read_meta(cfg: PipelineConfig, name: str, version: int) -> dict[str, Any]:
    return storage.read_json(storage.join(registry_root(cfg), name, f"v{version}", METADATA), cfg.storage)


def _pick_version(cfg: PipelineConfig, name: str, version: str | None) -> int:
    versions = _versions(cfg, name)
    if not versions:
        raise AdapterError(f"no adapter named {name!r} in {registry_root(cfg)}; "
                           "`ray-qlora adapters list CONFIG` shows what there is")
    if version in (None, "latest"):
        return versions[-1]
    n = _check_version(version)
    if n not in versions:
        raise AdapterError(f"adapter {name!r} has no version {version} "
                           f"(it has {', '.join(f'v{v}' for v in versions)})")
    return n


def show(cfg: PipelineConfig, name: str, version: str | None = None) -> dict[str, Any]:
    """An adapter version's metadata (the latest when ``version`` is None), with all its versions."""
    n = _pick_version(cfg, check_name(name), version)
    return {**_read_meta(cfg, name, n), "versions": [f"v{v}" for v in _versions(cfg, name)]}


def resolve(cfg: PipelineConfig, name: str, version: str | None = None) -> str:
    """The folder URI of a published adapter version (what serving loads)."""
    n = _pick_version(cfg, check_name(name), version)
    return storage.join(registry_root(cfg), name, f"v{n}")


def list_adapters(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """One row per name: its latest version's metadata and how many versions it has."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(registry_root(cfg), cfg.storage)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    rows = []
    for info in sorted(fs.get_file_info(pafs.FileSelector(path, recursive=False)), key=lambda i: i.base_name):
        if info.type != pafs.FileType.Directory or not re.fullmatch(ADAPTER_NAME, info.base_name):
            continue
        versions = _versions(cfg, info.base_name)
        if versions:
            rows.append({**_read_meta(cfg, info.base_name, versions[-1]), "versions": len(versions)})
    return rows


class NameCache:
    """The registry's adapter names for a server's model list, listed at most every ``ttl_s`` seconds:
    the registry is object storage, and a listing costs a request per adapter."""

    def __init__(self, ttl_s: float = 10.0) -> None:
        self.ttl_s, self._at, self._names = ttl_s, 0.0, []

    async def names(self, cfg: PipelineConfig) -> list[str]:
        import asyncio

        if time.time() - self._at > self.ttl_s:
            rows = await asyncio.to_thread(list_adapters, cfg)
            self._names, self._at = [r["name"] for r in rows], time.time()
        return self._names


def delete(cfg: PipelineConfig, name: str, version: str | None = None) -> list[str]:
    """Delete one version, or every version of ``name`` when ``version`` is None; returns what went."""
    check_name(name)
    targets = [_pick_version(cfg, name, version)] if version else _versions(cfg, name)
    if not targets:
        raise AdapterError(f"no adapter named {name!r} in {registry_root(cfg)}")
    gone = []
    for n in targets:
        folder = storage.join(registry_root(cfg), name, f"v{n}")
        # metadata first: a reader never sees a listed version with its files half gone
        fs, meta = storage.resolve(storage.join(folder, METADATA), cfg.storage)
        fs.delete_file(meta)
        storage.remove_tree(folder, cfg.storage)
        gone.append(f"{name}/v{n}")
    if not _versions(cfg, name):
        storage.remove_tree(storage.join(registry_root(cfg), name), cfg.storage)
    return gone


def format_list(rows: list[dict[str, Any]]) -> str:
    """The `adapters list` table."""
    if not rows:
        return "no adapters published yet"
    lines = [f"{'name':<28}{'latest':>7}{'versions':>9}  {'base':<24}{'run':<22}{'eval_loss':>10}  created"]
    for r in rows:
        loss = (r.get("metrics") or {}).get("best_eval_loss")
        lines.append(f"{r['name']:<28}{r['version']:>7}{r['versions']:>9}  {str(r['base_model'].get('ref'))[:23]:<24}"
                     f"{str(r.get('run_id'))[:21]:<22}{'' if loss is None else f'{loss:.4f}':>10}  {r['created']}")
    return "\n".join(lines)
