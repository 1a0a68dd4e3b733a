"""Stage 1, prepare: raw instruction files -> tokenized train/eval shards (Ray Data).

discover files (data/sources.py; every file read or listed with why not)
-> parts: files over data.split_bytes cut into byte ranges (JSONL; lines
   counted in parallel tasks), row-group runs (Parquet) or line stripes
   (gzip/zstd JSONL)
-> in an actor pool (one tokenizer per actor, one file part per task, streamed):
   read the part into raw rows, parse + normalise + validate +
   template/tokenize/mask + dedup keys
-> pre-flight checks (data/checks.py): a failure stops the stage
-> duplicates (data/dedup.py): keys held by 2+ rows found from the key
   column, those rows' groups verified and resolved
-> buckets: train / eval (seeded hash of the content) / quarantine / duplicate
-> mixing weights on train, packing (data/packing.py), Parquet shards,
   quarantine and duplicates with reasons, manifest.json.

Nothing is dropped silently: every row read ends in exactly one bucket, the
manifest reconciles ``read = train + eval + quarantine + duplicates`` per file
and in total, and the stage fails if it does not. Statistics come from Ray
Data aggregations; the driver holds file lists, counts, the dedup key column
(8 bytes a key) and the rows that collide on a key, never the dataset. A fingerprint of the inputs and
the data/tokenizer settings lets a re-run reuse an earlier result.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from ray_qlora import storage
from ray_qlora.config import PipelineConfig, StorageConfig
from ray_qlora.data import checks, dedup, sources
from ray_qlora.data.formats import Example, RowError, normalize_row
from ray_qlora.data.templating import end_of_turn_id, tokenize_conversations
from ray_qlora.errors import DataError

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    import ray.data
    from transformers import PreTrainedTokenizerBase

__all__ = ["BUCKETS", "assign_split", "content_hash", "prepare"]

log = logging.getLogger(__name__)

BUCKETS = ("train", "eval", "quarantine", "duplicate")
# Bump when the stage's output changes for the same inputs, so caches are not reused across it.
PREPARE_VERSION = 4  # 3: pieces of a render tokenized on their own; 4: tool use (tools column, tool front)


def content_hash(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """Identity of a conversation: equal messages (and tools), equal hash, whatever file they came from."""
    # without tools, the messages alone: hashes (and so train/eval splits) stay what they were
    canon = json.dumps(messages if tools is None else {"messages": messages, "tools": tools},
                       sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()


def _unit(*parts: object) -> float:
    """A number in [0, 1) from a seeded hash: the same inputs give the same number everywhere."""
    h = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def assign_split(chash: str, seed: int, eval_fraction: float) -> str:
    """'train' or 'eval' from the content hash and seed alone.

    Independent of file order and of how Ray partitions blocks, so a re-run
    gives the same split.
    """
    return "eval" if _unit(seed, chash) < eval_fraction else "train"


def repeats_for(weight: float, chash: str, seed: int) -> int:
    """Times a train example is used under its source's mixing weight: floor(w), plus one with
    probability frac(w) (seeded by its content), so a source contributes w x its examples on average."""
    whole = int(weight)
    return whole + (1 if _unit(seed, "mix", chash) < weight - whole else 0)


def _processed_schema() -> "pa.Schema":
    import pyarrow as pa

    return pa.schema([
        ("uid", pa.string()), ("path", pa.string()), ("source", pa.int32()), ("line", pa.int64()),
        ("record", pa.string()), ("raw", pa.string()), ("status", pa.string()), ("reason", pa.string()),
        ("messages", pa.string()), ("tools", pa.string()), ("content_hash", pa.string()),
        ("dedup_keys", pa.list_(pa.int64())),
        ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
        ("num_tokens", pa.int32()), ("num_label_tokens", pa.int32()), ("check_failures", pa.list_(pa.string())),
        ("check_failed", pa.bool_()),
    ])


class _RowProcessor:
    """Ray Data actor: raw rows -> tokenized rows, or quarantine rows with a reason."""

    def __init__(self, cfg_json: str, tok: "PreTrainedTokenizerBase | None") -> None:
        from ray_qlora.config import parse_config
        from ray_qlora.modeling import load_tokenizer, resolve_base

        self.cfg = parse_config(json.loads(cfg_json))
        d = self.cfg.data
        if tok is None:  # see _shippable
            tok = load_tokenizer(resolve_base(self.cfg.model, self.cfg.storage), d.chat_template,
                                 trust_remote_code=self.cfg.model.trust_remote_code)
        self.tok = tok
        self.eot = end_of_turn_id(self.tok)
        self.formats = [s.format or d.format for s in d.all_sources()]
        self.schema = _processed_schema()

    def _parsed(self, record: str, raw: str, reason: str, source: int) -> Example | str:
        """A data row's normalised messages and tools, or why it goes to quarantine ('' for a file record)."""
        if record == "file" or reason:  # a file's status record, or a row the reader rejected (not UTF-8)
            return reason
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as err:
            return f"invalid JSON: {err.msg} at char {err.pos}"
        d = self.cfg.data
        try:
            return normalize_row(row, self.formats[source], d.system_prompt, d.allow_text)
        except RowError as err:
            return str(err)

    def __call__(self, batch: "pa.Table") -> Iterator["pa.Table"]:
        """The rows in slices of data.batch_size.

        Ray Data merges the reader's batches into blocks of up to its target
        block size, a whole file here, and a row's Python objects (token id
        lists) take many times its Arrow bytes: processed whole, an actor's
        memory grew with the file (251 MiB at 1,250-row files, 559 at 12,500).
        """
        step = self.cfg.data.batch_size
        for start in range(0, batch.num_rows, step):
            yield self._rows(batch.slice(start, step))

    def _rows(self, batch: "pa.Table") -> "pa.Table":
        import pyarrow as pa

        d = self.cfg.data
        cols = batch.to_pydict()
        parsed = [self._parsed(*args) for args in zip(cols["record"], cols["raw"], cols["reason"], cols["source"])]
        examples = [p for p in parsed if isinstance(p, Example)]
        convs = [e.messages for e in examples]
        tokenized = iter(tokenize_conversations(self.tok, convs, d.max_seq_length, d.length_policy, self.eot,
                                                [e.tools for e in examples]))
        keys = iter(dedup.batch_dedup_keys(convs, d.dedup))
        empty = {"status": "quarantine", "reason": "", "messages": "", "tools": "", "content_hash": "",
                 "dedup_keys": [],
                 "input_ids": [], "labels": [], "num_tokens": 0, "num_label_tokens": 0, "check_failures": []}
        rows: list[dict[str, Any]] = []
        for record, p in zip(cols["record"], parsed):
            if record == "file":  # a file's status record travels through untouched
                rows.append({**empty, "status": "file", "reason": p})
                continue
            out, row_keys = (next(tokenized), next(keys)) if isinstance(p, Example) else (RowError(p), [])
            if isinstance(out, RowError):
                rows.append({**empty, "reason": str(out)})
                continue
            rows.append({**out, "status": "ok", "reason": "", "messages": json.dumps(p.messages, ensure_ascii=False),
                         "tools": json.dumps(p.tools, ensure_ascii=False) if p.tools else "",
                         "content_hash": content_hash(p.messages, p.tools), "dedup_keys": row_keys})
        out_cols = {name: cols[name] for name in sources.RAW_COLUMNS if name != "reason"}
        out_cols["check_failed"] = [bool(r["check_failures"]) for r in rows]
        for name in self.schema.names:
            if name not in out_cols:
                out_cols[name] = [r[name] for r in rows]
        return pa.Table.from_pydict(out_cols, schema=self.schema)


def _read_files(batch: dict[str, Any], files: dict[int, dict[str, Any]], storage_json: str,
                batch_rows: int) -> Iterator["pa.Table"]:
    """Ray Data UDF over a batch of file parts: every raw row of those parts, streamed."""
    import pyarrow as pa

    cfg = StorageConfig.model_validate_json(storage_json)
    schema = pa.schema([("uid", pa.string()), ("path", pa.string()), ("source", pa.int32()), ("line", pa.int64()),
                        ("record", pa.string()), ("raw", pa.string()), ("reason", pa.string())])
    for values in zip(*(batch[k] for k in ("file", "index", "start", "end", "first", "of"))):
        part = sources.Part(*map(int, values))
        for cols in sources.read_file(sources.InputFile(**files[part.file]), cfg, batch_rows, part):
            yield pa.Table.from_pydict(cols, schema=schema)


def _actor_pool(cfg: PipelineConfig) -> int | tuple[int, int, int]:
    """'auto': an autoscaling pool of 1 to one actor per CPU of the cluster, starting full.

    Starting at one actor, Ray Data's autoscaler kept a single actor on a
    2-CPU machine for the whole stage (files are few, large input blocks);
    starting full and letting idle actors go uses the cluster from the start.
    """
    import ray

    if cfg.data.num_actors != "auto":
        return int(cfg.data.num_actors)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return (1, cpus, cpus)


@contextlib.contextmanager
def _stage_data_context() -> Iterator[None]:
    """Datasets built inside use sort-based shuffle for their aggregations; the process's default is untouched.

    A Dataset copies the current DataContext when it is created, so setting a
    copy current for the duration of the stage scopes the change to the
    stage's datasets. Why sort shuffle: the default hash shuffle starts
    aggregator actors that reserve CPUs; on a 2-CPU cluster they starved the
    tasks feeding them.
    """
    import copy

    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    previous = DataContext.get_current()
    scoped = copy.deepcopy(previous)
    scoped.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    DataContext._set_current(scoped)
    try:
        yield
    finally:
        DataContext._set_current(previous)


def _reason_key(reason: str) -> str:
    """The kind of a reason, for counting: 'too long: 812 tokens > ...' -> 'too long'."""
    for kind in ("exact duplicate", "near-duplicate", "unrecognised row format"):
        if reason.startswith(kind):
            return kind
    return reason.split(":")[0]


def _bucket_batch(batch: "pa.Table", duplicates: dict[str, dedup.Duplicate], seed: int, eval_fraction: float,
                  weights: list[float]) -> "pa.Table":
    """Add bucket, reason_key, kept_uid and repeats columns: where each row ends up and why."""
    import pyarrow as pa

    cols = batch.select(["uid", "record", "status", "reason", "content_hash", "source"]).to_pydict()
    bucket, reasons, kept, repeats = [], [], [], []
    for uid, record, status, reason, chash, source in zip(*cols.values()):
        dup = duplicates.get(uid)
        if record == "file":
            b = "file"
        elif status == "quarantine":
            b = "quarantine"
        elif dup is not None:
            b, reason = "duplicate", dup[1]
        else:
            b = assign_split(chash, seed, eval_fraction)
        bucket.append(b)
        reasons.append(reason)
        kept.append(dup[0] if dup else "")
        repeats.append(repeats_for(weights[source], chash, seed) if b == "train" else 0)
    batch = batch.set_column(batch.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))
    return (batch.append_column("bucket", pa.array(bucket, pa.string()))
            .append_column("reason_key", pa.array([_reason_key(r) for r in reasons], pa.string()))
            .append_column("kept_uid", pa.array(kept, pa.string()))
            .append_column("repeats", pa.array(repeats, pa.int32())))


def _shared_keys(processed: "ray.data.Dataset") -> "np.ndarray":
    """Dedup keys held by more than one row.

    Only the key column comes to the driver (8 bytes a key, 1 + LSH bands
    keys a row), where numpy counts it in well under a second for millions
    of keys; Ray Data's groupby of the same keys took 30 s on 2 CPUs.
    """
    import numpy as np
    import pyarrow.compute as pc

    chunks = [pc.list_flatten(b.column("dedup_keys")).to_numpy()
              for b in processed.select_columns(["dedup_keys"]).iter_batches(batch_format="pyarrow", batch_size=None)]
    keys = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
    uniq, counts = np.unique(keys, return_counts=True)
    return uniq[counts > 1]


def _rows_with_keys(t: "pa.Table", shared: "np.ndarray") -> "pa.Table":
    """(key, uid, path, line, messages) for each shared key a row holds: the candidates' groups."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keys = t.column("dedup_keys")
    flat, parent = pc.list_flatten(keys), pc.list_parent_indices(keys)
    hit = pc.is_in(flat, value_set=pa.array(shared, pa.int64()))
    rows = pc.filter(parent, hit)
    return pa.table({"key": pc.filter(flat, hit), **{c: pc.take(t.column(c), rows)
                                                     for c in ("uid", "path", "line", "messages")}})


def _find_duplicates(processed: "ray.data.Dataset", cfg: PipelineConfig) -> dict[str, dedup.Duplicate]:
    """Rows sharing a dedup key, resolved into {dropped uid: (kept uid, reason)}."""
    d = cfg.data.dedup
    if not (d.exact or d.near):
        return {}
    shared = _shared_keys(processed)
    if not len(shared):
        return {}
    hits = processed.select_columns(["dedup_keys", "uid", "path", "line", "messages"]).map_batches(
        _rows_with_keys, fn_kwargs={"shared": shared}, batch_format="pyarrow").take_all()
    groups: dict[int, list[str]] = {}
    rows: dict[str, tuple[str, list[dict[str, str]]]] = {}
    for r in hits:
        groups.setdefault(r["key"], []).append(r["uid"])
        rows.setdefault(r["uid"], (f"{r['path']} line {r['line']}", json.loads(r["messages"])))
    return dedup.resolve(groups.values(), rows, d)


def _length_stats(hist: list[dict[str, Any]]) -> dict[str, float]:
    """min/mean/p50/p95/max from a histogram of exact token lengths."""
    pairs = sorted((int(h["num_tokens"]), int(h["count()"])) for h in hist)
    total = sum(c for _, c in pairs)
    if not total:
        return {}

    def pct(q: float) -> float:
        seen = 0
        for n, c in pairs:
            seen += c
            if seen >= q * total:
                return float(n)
        return float(pairs[-1][0])

    return {"min": pairs[0][0], "mean": round(sum(n * c for n, c in pairs) / total, 2),
            "p50": pct(0.5), "p95": pct(0.95), "max": pairs[-1][0]}


def _reconcile(files: list[sources.InputFile], parts: list[sources.Part], status: list[dict[str, Any]],
               counts: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Per-file and total counts; raises if any row read is not in exactly one bucket."""
    per_file: dict[str, dict[str, int]] = {}
    for c in counts:
        per_file.setdefault(c["path"], {}).setdefault(c["bucket"], 0)
        per_file[c["path"]][c["bucket"]] += int(c["count()"])
    read: dict[str, list[Any]] = {}  # uri -> [rows read, problems, parts reported], summed over its parts
    for s in status:
        got = read.setdefault(s["path"], [0, [], 0])
        got[0] += int(s["line"])
        got[1] += [s["reason"]] if s["reason"] else []
        got[2] += 1
    n_parts = collections.Counter(p.file for p in parts)
    entries, total = [], {"read": 0, **{b: 0 for b in BUCKETS}}
    for f in files:
        entry: dict[str, Any] = {"uri": f.uri, "source": f.source, "size": f.size}
        if f.skip:
            entries.append({**entry, "status": "skipped", "reason": f.skip})
            continue
        n_read, problems, reported = read.get(f.uri, (0, [], 0))
        if reported != n_parts[f.index]:
            problems = [*problems, f"{n_parts[f.index] - reported} of {n_parts[f.index]} part(s) sent no status "
                                   "back from the reader"]
        problem = "; ".join(dict.fromkeys(problems))  # a compressed file's stripes all meet its corruption
        got = {b: per_file.get(f.uri, {}).get(b, 0) for b in BUCKETS}
        if sum(got.values()) != n_read:
            raise RuntimeError(f"prepare: {f.uri}: {n_read} rows read but {sum(got.values())} placed ({got}); "
                               "rows went missing, this is a bug")
        entries.append({**entry, "status": "error" if problem else "read", "reason": problem or None,
                        "read": n_read, "parts": n_parts[f.index], **got})
        total["read"] += n_read
        for b in BUCKETS:
            total[b] += got[b]
    if total["read"] != sum(total[b] for b in BUCKETS):
        raise RuntimeError(f"prepare: totals do not reconcile: {total}")
    return entries, total


def _fingerprint(cfg: PipelineConfig, files: list[sources.InputFile], base: Any) -> str:
    """What decides prepare's output: the files (name, size, mtime), data settings, seed, tokenizer."""
    from pathlib import Path

    data = cfg.data.model_dump(mode="json", exclude={"num_actors", "batch_size", "cache", "split_bytes"})
    tok_files = sorted(p for p in Path(base).glob("*token*") if p.is_file()) if Path(base).is_dir() else []
    tok_hash = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in tok_files)).hexdigest()
    blob = json.dumps({"version": PREPARE_VERSION, "data": data, "packed": _packing(cfg), "seed": cfg.run.seed,
                       "tokenizer": tok_hash,
                       "base": cfg.model.base, "files": [(f.uri, f.size, f.mtime, f.source) for f in files]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _input_hash(files: list[sources.InputFile], cfg: PipelineConfig) -> str:
    """sha256 over (name, bytes) of every file read: the data lineage of the run.

    Streamed in 8 MiB chunks so a large input never sits in driver memory.
    """
    h = hashlib.sha256()
    for f in files:
        h.update(f.uri.encode())
        fs, path = storage.resolve(f.uri, cfg.storage)
        with contextlib.suppress(OSError), fs.open_input_stream(path) as stream:  # unreadable: listed already
            while chunk := stream.read(8 << 20):
                h.update(chunk)
    return h.hexdigest()


def _cache_index(cfg: PipelineConfig, fingerprint: str) -> str:
    return storage.join(cfg.run.output_uri, "prepared", f"{fingerprint}.json")


def _reuse(cfg: PipelineConfig, run: storage.RunPaths, fingerprint: str) -> dict[str, Any] | None:
    """An earlier prepare's manifest for the same fingerprint, its outputs copied into this run if needed."""
    index_uri = _cache_index(cfg, fingerprint)
    if not cfg.data.cache or not storage.exists(index_uri, cfg.storage):
        return None
    earlier = storage.RunPaths(storage.read_json(index_uri, cfg.storage)["run_root"])
    if not storage.exists(earlier.manifest, cfg.storage):
        return None
    manifest = storage.read_json(earlier.manifest, cfg.storage)
    if manifest.get("fingerprint") != fingerprint:
        return None
    if earlier.root != run.root:
        _clear_outputs(run, cfg)
        for part, dst in _uris(run).items():
            src = storage.join(earlier.root, "data", part)
            if storage.exists(src, cfg.storage):
                storage.copy_tree(src, dst, cfg.storage)
    manifest = {**manifest, "cache_hit": True, "cached_from": earlier.root,
                "uris": _uris(run)}
    storage.write_json(run.manifest, manifest, cfg.storage)
    return manifest


def _clear_outputs(run: storage.RunPaths, cfg: PipelineConfig) -> None:
    """Remove an earlier prepare's shards from the run folder: Ray writes new files beside old ones."""
    for uri in _uris(run).values():
        storage.remove_tree(uri, cfg.storage)


def _uris(run: storage.RunPaths) -> dict[str, str]:
    return {"train": run.train, "eval": run.eval, "quarantine": run.quarantine,
            "duplicates": storage.join(run.root, "data", "duplicates")}


def _write(ds: "ray.data.Dataset", columns: list[str], uri: str, cfg: PipelineConfig) -> None:
    fs, path = storage.resolve(uri, cfg.storage)
    ds.select_columns(columns).write_parquet(path, filesystem=fs)


def _expand_repeats(t: "pa.Table") -> "pa.Table":
    import pyarrow as pa

    reps = t.column("repeats").to_pylist()
    return t.take(pa.array([i for i, r in enumerate(reps) for _ in range(r)], pa.int64()))


def _pack(t: "pa.Table", capacity: int) -> "pa.Table":
    import pyarrow as pa

    from ray_qlora.data.packing import pack_examples

    packed = pack_examples(t.column("input_ids").to_pylist(), t.column("labels").to_pylist(), capacity)
    return pa.table(packed)


def _write_train(final: "ray.data.Dataset", cfg: PipelineConfig, run: storage.RunPaths) -> dict[str, Any]:
    """Train rows, weighted by their source, packed when configured; returns the row statistics."""
    from ray.data.expressions import col

    from ray_qlora.data.packing import packing_efficiency

    train = final.filter(expr=col("repeats") > 0).map_batches(_expand_repeats, batch_format="pyarrow")
    max_len = cfg.data.max_seq_length
    if _packing(cfg):
        train = train.map_batches(_pack, fn_kwargs={"capacity": max_len}, batch_size=4096,
                                  batch_format="pyarrow").materialize()
        cols = ["input_ids", "labels", "seq_lengths", "num_tokens", "num_label_tokens", "num_examples"]
    else:
        train = train.materialize()
        cols = ["input_ids", "labels", "num_tokens", "num_label_tokens", "messages", "tools", "content_hash", "source"]
    totals = _totals(train)
    rows, tokens = totals["count()"], totals["sum(num_tokens)"]
    if rows:
        _write(train, cols, run.train, cfg)
    return {"rows": rows, "tokens": tokens, "label_tokens": totals["sum(num_label_tokens)"],
            "packed": _packing(cfg),
            "efficiency": round(packing_efficiency(tokens, rows, max_len), 4) if _packing(cfg) else None}


def _totals(train: "ray.data.Dataset") -> dict[str, int]:
    """Rows, tokens and label tokens of the train rows, in one pass."""
    from ray.data.aggregate import Count, Sum

    got = train.select_columns(["num_tokens", "num_label_tokens"]).aggregate(
        Count(), Sum("num_tokens"), Sum("num_label_tokens"))
    return {k: int(got.get(k) or 0) for k in ("count()", "sum(num_tokens)", "sum(num_label_tokens)")}


def _packing(cfg: PipelineConfig) -> bool:
    """data.packing, 'auto' resolved: pack for GPU trials (padding-free batches, about 1.8x the tokens/s of
    padded ones on an H200); CPU trials keep one example a row."""
    import ray

    if cfg.data.packing != "auto":
        return bool(cfg.data.packing)
    return ray.cluster_resources().get("GPU", 0) > 0


def _discover(cfg: PipelineConfig) -> list[sources.InputFile]:
    try:
        files = sources.discover(cfg.data.all_sources(), cfg.storage)
    except OSError as err:  # nothing there, no such bucket, no access: the user's to fix
        raise DataError(f"data: {err}") from None
    if not any(f.skip is None for f in files):
        listed = "; ".join(f"{f.uri}: {f.skip}" for f in files[:5])
        raise DataError(f"data: no readable files under the configured sources ({listed})")
    return files


def prepare(cfg: PipelineConfig, run: storage.RunPaths) -> dict[str, Any]:
    """Run the stage; returns the manifest (also written to the run folder)."""
    from ray.data.expressions import col

    from ray_qlora.modeling import resolve_base

    files = _discover(cfg)
    readable = [f for f in files if f.skip is None]
    log.info("prepare: %d file(s), %d readable", len(files), len(readable))
    base = resolve_base(cfg.model, cfg.storage)  # convert/download once here, not in every actor
    tok, tok_checks = checks.tokenizer_checks(base, cfg)  # fails fast, before reading any data
    fingerprint = _fingerprint(cfg, files, base)
    cached = _reuse(cfg, run, fingerprint)
    if cached is not None:
        log.info("prepare: inputs and settings unchanged, reusing %s", cached["cached_from"])
        return cached

    with _stage_data_context():
        parts = sources.plan_parts(readable, cfg.storage, _split_bytes(cfg, readable), _count_in_tasks(cfg))
        if len(parts) > len(readable):
            log.info("prepare: %d file(s) read in %d parts", len(readable), len(parts))
        processed = _process(readable, parts, cfg, tok)
        checked = {**tok_checks(), **checks.row_checks(processed)}
        duplicates = _find_duplicates(processed, cfg)
        final = _bucketize(processed, duplicates, cfg)
        status = final.filter(expr=col("bucket") == "file").select_columns(["path", "line", "reason"]).take_all()
        stats = _statistics(final)
        entries, counts = _reconcile(files, parts, status, stats)
        _clear_outputs(run, cfg)
        _write_rejects(final, cfg, run, counts)  # first: a refusal below points the user at them
        if not counts["train"] or not counts["eval"]:
            raise DataError(
                f"prepare: {counts['train']} train / {counts['eval']} eval examples from {counts['read']} rows "
                f"({counts['quarantine']} quarantined, {counts['duplicate']} duplicates; see "
                f"{run.quarantine}); need both: fix the data or change data.eval_fraction")
        train = _write_examples(final, cfg, run)

    manifest = {**_summaries(stats, cfg), "label_tokens": {"train": train["label_tokens"]}, "train_rows": train,
                "packing_efficiency": train["efficiency"]}
    manifest.update({
        "fingerprint": fingerprint, "cache_hit": False, "files": entries, "counts": counts,
        "input_files": [f.uri for f in readable], "input_hash": _input_hash(readable, cfg),
        "checks": checked, "seed": cfg.run.seed, "eval_fraction": cfg.data.eval_fraction,
        "uris": _uris(run),
    })
    storage.write_json(run.manifest, manifest, cfg.storage)
    if cfg.data.cache:
        storage.write_json(_cache_index(cfg, fingerprint), {"run_root": run.root}, cfg.storage)
    log.info("prepare: %s (quarantine reasons %s)", counts, manifest["quarantine_reasons"])
    return manifest


def _bucketize(processed: "ray.data.Dataset", duplicates: dict[str, dedup.Duplicate],
               cfg: PipelineConfig) -> "ray.data.Dataset":
    """Every processed row with its bucket, reason, kept uid and repeats (held by Ray)."""
    weights = [s.weight for s in cfg.data.all_sources()]
    return processed.map_batches(
        _bucket_batch, fn_kwargs={"duplicates": duplicates, "seed": cfg.run.seed,
                                  "eval_fraction": cfg.data.eval_fraction, "weights": weights},
        batch_format="pyarrow").materialize()


def _shippable(tok: "PreTrainedTokenizerBase", cfg: PipelineConfig) -> "PreTrainedTokenizerBase | None":
    """The driver's checked tokenizer for the row actors, or None: they load it themselves.

    Unpickling it took 0.75 s an actor where loading it again took 3 s
    (AutoTokenizer imports torch), and the rows are then tokenized by exactly
    what the checks passed. A trust_remote_code tokenizer's class lives in a
    module Hugging Face writes on the loading node only, so those actors load
    their own.
    """
    return None if cfg.model.trust_remote_code else tok


def _split_bytes(cfg: PipelineConfig, readable: list[sources.InputFile]) -> int:
    """data.split_bytes, 'auto' resolved: about two parts per cluster CPU over all the input, so one
    large file keeps every actor busy and the last parts even out their finish; at least 1 MiB (a
    part's task and newline count cost little next to its rows), at most 64 MiB (a part's rows are
    streamed, but a retried task redoes the whole part)."""
    import ray

    if cfg.data.split_bytes != "auto":
        return int(cfg.data.split_bytes)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return min(64 << 20, max(1 << 20, sum(f.size for f in readable) // (2 * cpus)))


def _count_in_tasks(cfg: PipelineConfig) -> sources.CountAll:
    """Newline counts of byte ranges (see sources.plan_parts) as Ray tasks, so the ranges of a large
    file are counted in parallel where their bytes are fetched, not all through the driver."""
    import ray

    storage_cfg = cfg.storage

    def count_all(jobs: "Sequence[tuple[sources.InputFile, int, int]]") -> list[int | None]:
        count = ray.remote(num_cpus=1)(sources.count_newlines)
        return ray.get([count.remote(f, storage_cfg, a, b) for f, a, b in jobs])

    return count_all


def _process(readable: list[sources.InputFile], parts: list[sources.Part], cfg: PipelineConfig,
             tok: "PreTrainedTokenizerBase") -> "ray.data.Dataset":
    """File parts -> processed rows, held by Ray.

    The reader is fused into the actor pool: each actor task reads one file
    part (a whole file unless it is larger than data.split_bytes) and
    processes its rows in batches of data.batch_size, streaming. With a row
    batch size here instead, Ray would bundle many one-row part blocks into
    one task and one actor would read every file.
    """
    import ray.data

    items = ray.data.from_items([p.to_dict() for p in parts], override_num_blocks=len(parts))
    raw = items.map_batches(_read_files, batch_size=1, batch_format="numpy",
                            fn_kwargs={"files": {f.index: f.to_dict() for f in readable},
                                       "storage_json": cfg.storage.model_dump_json(),
                                       "batch_rows": cfg.data.batch_size})
    return raw.map_batches(
        _RowProcessor, fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(), "tok": _shippable(tok, cfg)},
        concurrency=_actor_pool(cfg), batch_size=None, batch_format="pyarrow").materialize()


def _write_rejects(final: "ray.data.Dataset", cfg: PipelineConfig, run: storage.RunPaths,
                   counts: dict[str, int]) -> None:
    """Quarantine and duplicates written, each with its reason; ``counts`` (from ``_statistics``)
    skips empty buckets, as each write is a pass over the rows."""
    from ray.data.expressions import col

    for bucket, cols, uri in (("quarantine", ["uid", "path", "line", "raw", "reason"], run.quarantine),
                              ("duplicate", ["uid", "path", "line", "raw", "reason", "kept_uid"],
                               _uris(run)["duplicates"])):
        if counts[bucket]:
            _write(final.filter(expr=col("bucket") == bucket), cols, uri, cfg)


def _write_examples(final: "ray.data.Dataset", cfg: PipelineConfig, run: storage.RunPaths) -> dict[str, Any]:
    """Eval and train shards written; returns the train rows' statistics."""
    from ray.data.expressions import col

    _write(final.filter(expr=col("bucket") == "eval"),
           ["input_ids", "labels", "num_tokens", "num_label_tokens", "messages", "tools", "content_hash", "source"],
           run.eval, cfg)
    return _write_train(final, cfg, run)


def _statistics(final: "ray.data.Dataset") -> list[dict[str, Any]]:
    """Row counts and train uses per (file, bucket, reason kind, length, source): one aggregation
    from which every count of the manifest is read.

    The parts' status records are grouped too, under bucket 'file' (the readers of BUCKETS skip
    it): every read part has one, so the dataset is never empty (an empty one has no columns to
    group by) and needs no counting pass first.
    """
    from ray.data.aggregate import Count, Sum

    keys = ["path", "bucket", "reason_key", "num_tokens", "source"]
    return final.select_columns([*keys, "repeats"]).groupby(keys).aggregate(Count(), Sum("repeats")).take_all()


def _summaries(stats: list[dict[str, Any]], cfg: PipelineConfig) -> dict[str, Any]:
    """The manifest's reasons, length statistics and mixing, from ``_statistics``."""
    def total(bucket: str, key: str) -> dict[Any, int]:
        out: dict[Any, int] = {}
        for s in stats:
            if s["bucket"] == bucket:
                out[s[key]] = out.get(s[key], 0) + int(s["count()"])
        return out

    mixing: dict[int, list[int]] = {}
    for s in stats:
        if s["bucket"] == "train":
            got = mixing.setdefault(int(s["source"]), [0, 0])
            got[0] += int(s["count()"])
            got[1] += int(s["sum(repeats)"] or 0)
    return {
        "quarantine_reasons": total("quarantine", "reason_key"),
        "duplicate_kinds": total("duplicate", "reason_key"),
        "token_lengths": {b: _length_stats([{"num_tokens": n, "count()": c} for n, c in total(b, "num_tokens").items()])
                          for b in ("train", "eval")},
        "mixing": [{"source": src.uri, "weight": src.weight, "train_examples": mixing.get(i, [0, 0])[0],
                    "train_uses": mixing.get(i, [0, 0])[1]} for i, src in enumerate(cfg.data.all_sources())],
    }


