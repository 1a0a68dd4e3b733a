"""Stage 1, prepare: raw instruction files -> tokenized train/eval shards (Ray Data).

read (JSONL as text lines, so one bad line cannot sink the file; Parquet as
rows) -> parse + normalise + validate + template/tokenize/mask (one actor
pass, one tokenizer per actor) -> exact dedup -> deterministic split ->
Parquet shards + quarantine + manifest in the run folder.

Nothing is dropped silently: every row ends in train, eval or quarantine
(with a reason), and the manifest's counts add up to the rows read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any

from ray_qlora import storage
from ray_qlora.config import PipelineConfig
from ray_qlora.data.formats import RowError, normalize_row
from ray_qlora.data.templating import tokenize_conversation

if TYPE_CHECKING:
    import pandas as pd
    import ray.data

__all__ = ["assign_split", "content_hash", "prepare"]

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def content_hash(messages: list[dict[str, str]]) -> str:
    """Identity of a conversation: equal messages, equal hash, whatever file they came from."""
    canon = json.dumps(messages, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()


def assign_split(chash: str, seed: int, eval_fraction: float) -> str:
    """'train' or 'eval' from the content hash and seed alone.

    Independent of file order and of how Ray partitions blocks, so a re-run
    gives the same split, and duplicates cannot straddle train and eval.
    """
    h = hashlib.sha256(f"{seed}:{chash}".encode()).digest()
    return "eval" if int.from_bytes(h[:8], "big") / 2**64 < eval_fraction else "train"


class _RowProcessor:
    """Ray Data UDF: raw JSON text -> a tokenized row, or a quarantine row with a reason."""

    def __init__(self, cfg_json: str) -> None:
        from ray_qlora.config import parse_config
        from ray_qlora.modeling import load_tokenizer, resolve_base

        self.cfg = parse_config(json.loads(cfg_json))
        self.tok = load_tokenizer(resolve_base(self.cfg.model, self.cfg.storage))

    def _one(self, raw: str) -> dict[str, Any]:
        d = self.cfg.data
        try:
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as err:
                raise RowError(f"invalid JSON: {err.msg} at char {err.pos}") from None
            msgs = normalize_row(row, d.format, d.system_prompt)
            tokens = tokenize_conversation(self.tok, msgs, d.max_seq_length, d.length_policy)
        except RowError as err:
            return {"ok": False, "reason": str(err), "messages": "", "content_hash": "",
                    "split": "", "input_ids": [], "labels": [], "num_tokens": 0, "num_label_tokens": 0}
        chash = content_hash(msgs)
        return {"ok": True, "reason": "", "messages": json.dumps(msgs, ensure_ascii=False),
                "content_hash": chash, "split": assign_split(chash, self.cfg.run.seed, d.eval_fraction),
                **tokens}

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        rows = [self._one(r) for r in batch["raw"]]
        out: dict[str, list[Any]] = {k: [r[k] for r in rows] for k in rows[0]}
        out["raw"], out["path"] = list(batch["raw"]), list(batch["path"])
        return out


def _read_raw(files: list[str], cfg: PipelineConfig) -> "ray.data.Dataset":
    """All input files as one dataset of {raw: JSON text of one row, path: source file}."""
    import ray.data

    fs, _ = storage.resolve(files[0], cfg.storage)
    paths = [storage.resolve(f, cfg.storage)[1] for f in files]
    parts = []
    jsonl = [p for p in paths if p.endswith((".jsonl", ".json"))]
    if jsonl:
        lines = ray.data.read_text(jsonl, filesystem=fs, include_paths=True, drop_empty_lines=True)
        parts.append(lines.map_batches(
            lambda b: {"raw": list(b["text"]), "path": list(b["path"])}, batch_format="numpy"))
    parquet = [p for p in paths if p.endswith(".parquet")]
    if parquet:
        tables = ray.data.read_parquet(parquet, filesystem=fs, include_paths=True)
        # to_pylist gives plain Python objects (nested lists of dicts), which json can dump.
        parts.append(tables.map_batches(
            lambda t: {"raw": [json.dumps({k: v for k, v in r.items() if k != "path"}, default=str)
                               for r in t.to_pylist()],
                       "path": t.column("path").to_pylist()},
            batch_format="pyarrow"))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _mark_duplicates(group: "pd.DataFrame") -> "pd.DataFrame":
    """One content-hash group: keep the first row (by source), quarantine the rest."""
    group = group.sort_values(["path", "raw"], kind="stable").reset_index(drop=True)
    if len(group) > 1:
        first = group.loc[0, "path"]
        group.loc[1:, "ok"] = False
        group.loc[1:, "reason"] = f"duplicate of a conversation in {first}"
    return group


def _length_stats(ds: "ray.data.Dataset") -> dict[str, float]:
    import numpy as np

    lengths = ds.select_columns(["num_tokens"]).to_pandas()["num_tokens"].to_numpy()
    if len(lengths) == 0:
        return {}
    return {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 2),
            "p50": float(np.percentile(lengths, 50)), "p95": float(np.percentile(lengths, 95)),
            "max": int(lengths.max())}


def _input_hash(files: list[str], cfg: PipelineConfig) -> str:
    """sha256 over (name, bytes) of every input file: the data lineage of the run.

    Streamed in 8 MiB chunks so a large input never sits in driver memory.
    """
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode())
        fs, path = storage.resolve(f, cfg.storage)
        with fs.open_input_stream(path) as stream:
            while chunk := stream.read(8 << 20):
                h.update(chunk)
    return h.hexdigest()


def _write(ds: "ray.data.Dataset", columns: list[str], uri: str, cfg: PipelineConfig) -> None:
    fs, path = storage.resolve(uri, cfg.storage)
    ds.select_columns(columns).write_parquet(path, filesystem=fs)


def _use_task_shuffle() -> None:
    """Dedup's groupby through task-based sort shuffle.

    The default hash shuffle starts aggregator actors that reserve CPUs; on a
    2-CPU local cluster they starved the filter tasks feeding them, and one
    aborted at teardown. Must run before the datasets are built.
    """
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    DataContext.get_current().shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED


def prepare(cfg: PipelineConfig, run: storage.RunPaths) -> dict[str, Any]:
    """Run the stage; returns the manifest (also written to the run folder)."""
    from ray_qlora.modeling import resolve_base

    files = [f for uri in cfg.data.input_uris for f in storage.list_files(uri, cfg.storage, DATA_SUFFIXES)]
    if not files:
        raise FileNotFoundError(f"data.input_uris: no {'/'.join(DATA_SUFFIXES)} files under {cfg.data.input_uris}")
    log.info("prepare: %d input file(s)", len(files))
    resolve_base(cfg.model, cfg.storage)  # convert/download once here, not in every actor
    _use_task_shuffle()

    processed = _read_raw(files, cfg).map_batches(
        _RowProcessor, fn_constructor_kwargs={"cfg_json": cfg.model_dump_json()},
        concurrency=1, batch_size=256, batch_format="numpy").materialize()
    ok = processed.filter(lambda r: r["ok"])
    if cfg.data.dedup:
        ok = ok.groupby("content_hash").map_groups(_mark_duplicates, batch_format="pandas").materialize()
    # Quarantine comes in two parts (rows rejected by the row pass, duplicates
    # found by dedup), written side by side into one folder.
    rejected = [processed.filter(lambda r: not r["ok"]).materialize(),
                ok.filter(lambda r: not r["ok"]).materialize()]
    train = ok.filter(lambda r: r["ok"] and r["split"] == "train").materialize()
    evals = ok.filter(lambda r: r["ok"] and r["split"] == "eval").materialize()
    counts = {"read": processed.count(), "train": train.count(), "eval": evals.count(),
              "quarantine": sum(q.count() for q in rejected)}
    if not counts["train"] or not counts["eval"]:
        raise ValueError(f"prepare: {counts['train']} train / {counts['eval']} eval examples after quarantine; "
                         "need both: add data or change data.eval_fraction")

    cols = ["input_ids", "labels", "num_tokens", "num_label_tokens", "messages", "content_hash"]
    _write(train, cols, run.train, cfg)
    _write(evals, cols, run.eval, cfg)
    for q in rejected:
        if q.count():
            _write(q, ["path", "raw", "reason"], run.quarantine, cfg)

    reasons: dict[str, int] = {}
    for reason in (x for q in rejected for x in q.select_columns(["reason"]).to_pandas()["reason"]):
        key = reason.split(":")[0]  # group "too long: 812 tokens..." under "too long"
        reasons[key] = reasons.get(key, 0) + 1
    manifest = {
        "input_files": files,
        "input_hash": _input_hash(files, cfg),
        "counts": counts,
        "quarantine_reasons": reasons,
        "token_lengths": {"train": _length_stats(train), "eval": _length_stats(evals)},
        "label_tokens": {"train": int(train.sum("num_label_tokens"))},
        "seed": cfg.run.seed,
        "eval_fraction": cfg.data.eval_fraction,
        "uris": {"train": run.train, "eval": run.eval, "quarantine": run.quarantine},
    }
    storage.write_json(run.manifest, manifest, cfg.storage)
    log.info("prepare: %s (quarantine reasons %s)", manifest["counts"], reasons)
    return manifest
