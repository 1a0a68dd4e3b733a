"""Stage 4, evaluate: base vs tuned on the held-out split, generated on the cluster.

Generation is Ray Data batch inference: the eval rows flow through a pool of
actors that each load the model once (on a GPU where the cluster has them),
so an eval set of thousands of rows uses every node. Each actor also scores
the rows teacher-forced (loss on assistant tokens only, like training).

Metrics come from the config (eval.metrics, eval.regex, eval.scorer,
eval.json_schema): exact and normalised match, valid-JSON rate, JSON
equality and per-field accuracy, a regex, a JSON schema, and a user
function. With eval.constrained, answers are generated under the schema, as
the endpoint serves a request that asks for it (response_format); with
serve.strict_tools, a row's calls are held to its tools, as the endpoint
holds them (report.json says which: "generated_under"). Writes
report.json, summary.md (the table and side-by-side samples) and a bar
chart, and puts the figures in the model card.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import re
import string
import sys
import time
import unicodedata
from typing import Any, Callable

from ray_qlora import resources, storage
from ray_qlora.config import ConfigError, PipelineConfig
from ray_qlora.errors import UserError

__all__ = ["calls_text", "evaluate", "format_table", "load_scorer", "normalize", "prediction", "reference",
           "task_metrics", "tool_metrics"]

log = logging.getLogger(__name__)

_PUNCT = str.maketrans("", "", string.punctuation)
ACTOR_START_TIMEOUT_S = 600  # model load per actor; past this the cluster cannot fit the pool: fail, not hang
FREE_WAIT_S = 60  # for resources a finished pool or trial gives back; what is held longer is held by other work


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


def normalize(text: str) -> str:
    """Lower case, no punctuation, single spaces: 'Take 5 mg.' and 'take 5mg' stay apart, case and stops don't."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_PUNCT)
    return " ".join(text.split())


def calls_text(functions: list[dict[str, Any]]) -> str:
    """Tool calls ({name, arguments}, arguments as an object or its JSON text) as one canonical JSON text.

    A call is scored on what it does, not how it was spelled: key order and spacing are normalised, so
    exact_match compares names and arguments.
    """
    calls = [{"name": f["name"], "arguments": _parse_json(f["arguments"]) if isinstance(f["arguments"], str)
              else f["arguments"]} for f in functions]
    return json.dumps(calls, sort_keys=True, ensure_ascii=False)


def reference(message: dict[str, Any]) -> str:
    """What a held-out answer is scored against: its text, or its tool calls when it makes any."""
    if message.get("tool_calls"):
        return calls_text([c["function"] for c in message["tool_calls"]])
    return message["content"]


def prediction(text: str, tok: Any = None) -> tuple[str, bool]:
    """A generated answer as it is scored, and whether it made tool calls: its calls, read as the server
    reads them (``tok``'s response_template, else Hermes tags), else its text."""
    from ray_qlora.serve.tools import read_calls

    calls = read_calls({"text": text, "finish_reason": "stop"}, "auto", tok=tok)["tool_calls"]
    return (calls_text([c["function"] for c in calls]), True) if calls else (text, False)


def tool_metrics(predictions: list[str], references: list[str], ref_calls: list[bool],
                 pred_calls: list[bool]) -> dict[str, float]:
    """Tool use, when some held-out answers are calls (else {}), as shares:

    - ``call_exact``: of the answers that are calls, those called with the same functions and arguments;
    - ``call_name_match``: of those, the ones calling the same functions, whatever the arguments;
    - ``text_not_called``: of the answers that are text, those the model answered without calling.
    """
    calls = [i for i, called in enumerate(ref_calls) if called]
    if not calls:
        return {}

    def names(text: str) -> list[str]:
        return [c["name"] for c in json.loads(text)]

    out = {"call_exact": sum(predictions[i] == references[i] for i in calls) / len(calls),
           "call_name_match": sum(pred_calls[i] and names(predictions[i]) == names(references[i])
                                  for i in calls) / len(calls)}
    texts = [i for i, called in enumerate(ref_calls) if not called]
    if texts:
        out["text_not_called"] = sum(not pred_calls[i] for i in texts) / len(texts)
    return out


def load_scorer(spec: str) -> Callable[[str, str], float]:
    """``module:function`` -> the function; a ConfigError naming eval.scorer if it cannot be imported."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"invalid config: eval.scorer: cannot import {spec!r} ({err})") from None
    if not callable(fn):
        raise ConfigError(f"invalid config: eval.scorer: {spec!r} is not a function")
    return fn


def _json_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    n = len(references)
    refs = [_parse_json(r) for r in references]
    preds = [_parse_json(p) for p in predictions]
    fields = [(k, v, p) for p, r in zip(preds, refs) if isinstance(r, dict) for k, v in r.items()]
    return {"valid_json": sum(isinstance(p, dict) for p in preds) / n,
            "json_match": sum(p == r for p, r in zip(preds, refs)) / n,
            "field_accuracy": (sum(isinstance(p, dict) and p.get(k) == v for k, v, p in fields) / len(fields)
                               if fields else 0.0)}


def _chosen_metrics(references: list[str], task: str, metrics: list[str] | None, regex: str | None,
                    schema: dict[str, Any] | None) -> list[str]:
    if metrics:
        return list(metrics)
    is_json = task == "json" or (task == "auto" and all(isinstance(_parse_json(r), dict) for r in references))
    chosen = ["exact_match", "normalized_match"]
    chosen += ["valid_json", "json_match", "field_accuracy"] if is_json else []
    return chosen + (["regex_match"] if regex else []) + (["schema_valid"] if schema is not None else [])


def _schema_valid(predictions: list[str], schema: dict[str, Any]) -> float:
    """Share of predictions that parse as JSON and validate against ``schema``."""
    from jsonschema import validators

    validator = validators.validator_for(schema)(schema)
    ok = 0
    for p in predictions:
        try:
            parsed = json.loads(p)
        except json.JSONDecodeError:
            continue
        ok += validator.is_valid(parsed)  # a bare null is a value too: the schema says whether it may be one
    return ok / len(predictions)


def task_metrics(predictions: list[str], references: list[str], task: str = "auto",
                 metrics: list[str] | None = None, regex: str | None = None,
                 scorer: Callable[[str, str], float] | None = None,
                 schema: dict[str, Any] | None = None) -> dict[str, float]:
    """Each chosen metric as the share of examples (0..1); ``scorer``'s mean under its function name."""
    n = len(references)
    if not n:
        return {}
    out: dict[str, float] = {}
    chosen = _chosen_metrics(references, task, metrics, regex, schema)
    if "exact_match" in chosen:
        out["exact_match"] = sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / n
    if "normalized_match" in chosen:
        out["normalized_match"] = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / n
    if any(m in chosen for m in ("valid_json", "json_match", "field_accuracy")):
        out.update({k: v for k, v in _json_metrics(predictions, references).items() if k in chosen})
    if "regex_match" in chosen and regex:
        pattern = re.compile(regex)
        out["regex_match"] = sum(bool(pattern.fullmatch(p.strip())) for p in predictions) / n
    if "schema_valid" in chosen and schema is not None:
        out["schema_valid"] = _schema_valid(predictions, schema)
    if scorer is not None:
        scores = [float(scorer(p, r)) for p, r in zip(predictions, references)]
        out[getattr(scorer, "__name__", "scorer")] = sum(scores) / n
    return out


class _Generator:
    """A Ray Data actor: one model, loaded once; greedy answers and teacher-forced loss per batch."""

    def __init__(self, cfg_json: str, model_ref: str, adapter_uri: str | None = None) -> None:
        import torch

        from ray_qlora.config import parse_config
        from ray_qlora.generation import inference_dtype
        from ray_qlora.modeling import load_16bit, load_tokenizer, pick_device, resolve_base

        import ray

        cfg = self.cfg = parse_config(json.loads(cfg_json))
        self.actor_id = ray.get_runtime_context().get_actor_id() or "driver"
        device = pick_device()
        if device == "cpu":
            torch.set_num_threads(cfg.eval.cpus_per_actor)
        trust = cfg.model.trust_remote_code
        if model_ref == "base":  # the base as training saw it: the config's chat template applied
            path = resolve_base(cfg.model, cfg.storage)
            self.tok = load_tokenizer(path, cfg.data.chat_template, trust_remote_code=trust)
        else:  # a merged folder carries its own template
            path = storage.copy_dir_from(model_ref, None, cfg.storage)
            self.tok = load_tokenizer(path, trust_remote_code=trust)
        self.model = load_16bit(path, inference_dtype(cfg.merge.dtype, device), device, trust)
        if adapter_uri:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, str(storage.copy_dir_from(adapter_uri, None, cfg.storage)))
            self.model.eval()
        self.grammar: Any = None
        self.grammars: Any = None
        constrained = cfg.eval.constrained and cfg.eval.json_schema is not None
        if constrained or cfg.serve.strict_tools:
            from ray_qlora.structured import Grammars

            self.grammars = Grammars(self.tok, int(self.model.config.vocab_size))
        if constrained:
            self.grammar = self.grammars.compile(
                json.dumps(cfg.eval.json_schema))  # in the config's key order: properties come in that order

    def _strict_calls(self, tools: list[list[dict[str, Any]] | None] | None) -> list[Any] | None:
        """One grammar per row holding its calls to its own tools, as the endpoint holds them under
        serve.strict_tools (None: no row has tools, strict calls are off, or calls are not Hermes tags)."""
        from ray_qlora.serve.tools import strict_tag

        if self.grammars is None or not any(tools or []) or getattr(self.tok, "response_template", None) is not None:
            return None
        return [self.grammars.compile(json.dumps(strict_tag([t["function"] for t in row or []])), "structural_tag")
                for row in tools or []]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from ray_qlora.generation import generate

        convs = [json.loads(m)[:-1] for m in batch["messages"]]
        tools = [json.loads(t) if t else None for t in batch["tools"]] if "tools" in batch else None
        # eval.constrained's schema holds every answer, calls included (as a JSON response_format does)
        grammar = self.grammar if self.grammar is not None else self._strict_calls(tools)
        outs = generate(self.model, self.tok, convs, self.cfg.eval.max_new_tokens, len(convs), grammar=grammar,
                        tools=tools)
        losses = [self._loss(list(i), list(lab)) for i, lab in zip(batch["input_ids"], batch["labels"])]
        scored = [prediction(o["text"], self.tok) for o in outs]
        return {"content_hash": batch["content_hash"], "prediction": [text for text, _ in scored],
                "called": [called for _, called in scored],
                "actor": [self.actor_id] * len(outs),
                "completion_tokens": [o["completion_tokens"] for o in outs],
                "loss_sum": [s for s, _ in losses], "loss_tokens": [n for _, n in losses]}

    def _loss(self, ids: list[int], labels: list[int]) -> tuple[float, int]:
        """Summed loss over one row's assistant tokens (position t predicts token t+1), and their count."""
        import torch

        x = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        y = torch.tensor(labels[1:], dtype=torch.long, device=self.model.device)  # Arrow gives int32
        with torch.inference_mode():
            logits = self.model(input_ids=x).logits[0, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits, y, ignore_index=-100, reduction="sum")
        return float(loss), int((y != -100).sum())


def eval_rows(cfg: PipelineConfig, run: storage.RunPaths) -> "Any":
    """The held-out rows evaluated: sorted by content hash (stable across runs), the first eval.max_examples."""
    import pyarrow.dataset as pads

    fs, path = storage.resolve(run.eval, cfg.storage)
    data = pads.dataset(path, filesystem=fs, format="parquet")
    tools = ["tools"] if "tools" in data.schema.names else []  # shards written before tool use have none
    table = data.to_table(columns=["content_hash", "messages", *tools, "input_ids", "labels"]).sort_by("content_hash")
    return table.slice(0, cfg.eval.max_examples) if cfg.eval.max_examples else table


def _actor_need(nodes: list[dict[str, float]], cfg: PipelineConfig) -> dict[str, float]:
    """What one generation actor reserves: eval.cpus_per_actor CPUs, and a GPU where the cluster has one."""
    gpu = 1.0 if any(n.get("GPU", 0) >= 1 for n in nodes) else 0.0
    return {"CPU": float(cfg.eval.cpus_per_actor), "GPU": gpu}


def _actors(cfg: PipelineConfig, rows: int) -> tuple[int, dict[str, float]]:
    """(actors, what each reserves): one per GPU where the cluster has them, else one per cpus_per_actor CPUs.

    A ConfigError with the numbers when no node can hold one actor, or the cluster cannot hold
    eval.num_actors of them (Ray Data would wait for them until its start timeout).
    """
    nodes = resources.live_nodes()
    need = _actor_need(nodes, cfg)
    capacity = resources.capacity(nodes, need)
    n = capacity if cfg.eval.num_actors == "auto" else cfg.eval.num_actors
    if not cfg.tune.cluster_autoscales and max(n, 1) > capacity:  # an autoscaling one starts nodes on demand
        what = f"{need['CPU']:g} CPU" + (" and 1 GPU" if need["GPU"] else "")
        largest = max((node.get("CPU", 0.0) for node in nodes), default=0.0)
        key = "eval.cpus_per_actor" if capacity == 0 else "eval.num_actors"
        raise ConfigError(f"invalid config: {key}: evaluate wants {max(n, 1)} generation actor(s) of {what} each "
                          f"on one node, and this cluster holds {capacity} ({len(nodes)} node(s), the largest "
                          f"with {largest:g} CPU); lower eval.cpus_per_actor or eval.num_actors, or use a "
                          "bigger cluster")
    batches = max(1, math.ceil(rows / cfg.eval.batch_size))
    return max(1, min(n, batches)), need


def _free_room(actors: int, need: dict[str, float]) -> int:
    """The actors the nodes' free resources hold now, up to ``actors``.

    Waits up to FREE_WAIT_S for them: a pool or a trial that just finished gives its resources back within
    seconds. What is still held after that is held by other work (a served model keeps its replicas').
    """
    start, told = time.monotonic(), False
    while True:
        room = resources.capacity(resources.free_per_node(), need)  # per node: free CPUs split over nodes
        waited = time.monotonic() - start
        if room >= actors or waited >= FREE_WAIT_S:
            return min(room, actors)
        if not told and waited >= 5:  # the last pool's actors take a second or so to go: not worth a line
            log.info("evaluate: waiting up to %ds for free resources: %d actor(s) fit what is free now, %d "
                     "wanted", FREE_WAIT_S, room, actors)
            told = True
        time.sleep(1.0)


def _free_summary(need: dict[str, float], shown: int = 8) -> str:
    """What is free for the error message: cluster-wide, and node by node where several nodes have some
    (why a sum that looks big enough holds no actor); the ``shown`` nodes with the most free CPUs."""
    import ray

    nodes = resources.free_per_node()  # one read: the cluster-wide figure is its sum, so the two agree
    free = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    text = (f"{free['CPU']:g} of {ray.cluster_resources().get('CPU', 0.0):g} CPU free"
            + (f", {free['GPU']:g} GPU" if need["GPU"] else ""))
    some = sorted((n for n in nodes if n.get("CPU", 0.0) > 0), key=lambda n: -n.get("CPU", 0.0))
    if len(some) > 1:
        each = [f"{n.get('CPU', 0.0):g} CPU" + (f" + {n.get('GPU', 0.0):g} GPU" if need["GPU"] else "")
                for n in some[:shown]]
        text += "; free on each node: " + ", ".join(each) + (", ..." if len(some) > shown else "")
    return text


def _start_actors(cfg: PipelineConfig, rows: int) -> tuple[int, dict[str, float]]:
    """The actors to start and what each reserves: as many as the cluster holds (_actors), fewer when other
    work holds part of it, and a UserError (not a wait until the start timeout) when it holds all of it."""
    actors, need = _actors(cfg, rows)
    if cfg.tune.cluster_autoscales:  # what is not free now, new nodes bring
        return actors, need
    room = _free_room(actors, need)
    if room >= actors:
        return actors, need
    held = _free_summary(need)
    if room == 0:
        raise UserError(f"evaluate: no generation actor ({need['CPU']:g} CPU" + (" and 1 GPU" if need["GPU"] else "")
                        + f") fits what other work leaves free on this cluster ({held}; waited {FREE_WAIT_S}s); a "
                        "served model keeps its replicas' resources until it is stopped (`serve shutdown`, or "
                        "Ctrl-C on `ray-qlora serve`); or lower eval.cpus_per_actor")
    log.warning("evaluate: %d of %d generation actor(s) fit what other work leaves free (%s); going on with %d",
                room, actors, held, room)
    return room, need


def generate_on_cluster(cfg: PipelineConfig, table: Any, model_ref: str,
                        adapter_uri: str | None = None) -> dict[str, dict[str, Any]]:
    """Run one model over the rows on a Ray Data actor pool: {content_hash: prediction, loss...}."""
    import ray

    actors, need = _start_actors(cfg, table.num_rows)
    log.info("evaluate: %s on %d rows with %d actor(s)%s", model_ref if model_ref == "base" else "tuned model",
             table.num_rows, actors, " (1 GPU each)" if need["GPU"] else "")
    # One block per batch, one batch in flight per actor, and no rows handed out before
    # every actor has its model loaded: otherwise the first actor up takes the whole queue.
    size = cfg.eval.batch_size
    blocks = [table.slice(i, size) for i in range(0, table.num_rows, size)] or [table]
    ctx = ray.data.DataContext.get_current()
    saved, ctx.wait_for_min_actors_s = ctx.wait_for_min_actors_s, ACTOR_START_TIMEOUT_S
    quiet = _StartTimeoutOffTheConsole()
    logging.getLogger("ray.data.exceptions").addFilter(quiet)
    try:
        ds = ray.data.from_arrow(blocks).map_batches(
            _Generator, fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(), "model_ref": model_ref,
                                               "adapter_uri": adapter_uri},
            batch_size=size, batch_format="numpy", num_cpus=need["CPU"], num_gpus=need["GPU"],
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1))
        rows = ds.take_all()
    except ray.exceptions.GetTimeoutError:
        raise UserError(f"evaluate: {actors} generation actor(s) did not start within {ACTOR_START_TIMEOUT_S}s: "
                        "the resources they reserve were not freed (or loading the model took longer); see "
                        "`ray status`") from None
    finally:
        ctx.wait_for_min_actors_s = saved
        logging.getLogger("ray.data.exceptions").removeFilter(quiet)
    return {r["content_hash"]: r for r in rows}


class _StartTimeoutOffTheConsole(logging.Filter):
    """Keeps Ray Data's report of a pool that did not start (an "internal code" error and its stack trace)
    in its log file and off the console, where the UserError above says what to do instead.

    Ray Data logs the report while it handles the timeout, so the exception is the one being handled;
    ``hide`` is the attribute Ray Data's own console handler filters on.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        import ray

        handled = sys.exc_info()[1]
        if isinstance(handled, ray.exceptions.GetTimeoutError) and "starting actors" in str(handled):
            record.hide = True
        return True


def _score(name: str, cfg: PipelineConfig, table: Any, model_ref: str, adapter_uri: str | None = None,
           scorer: Callable[[str, str], float] | None = None) -> dict[str, Any]:
    out = generate_on_cluster(cfg, table, model_ref, adapter_uri)
    hashes = table.column("content_hash").to_pylist()
    answers = [json.loads(m)[-1] for m in table.column("messages").to_pylist()]
    refs = [reference(a) for a in answers]
    preds = [out[h]["prediction"] for h in hashes]
    loss = sum(out[h]["loss_sum"] for h in hashes) / max(1, sum(out[h]["loss_tokens"] for h in hashes))
    metrics = {"eval_loss": loss, **task_metrics(preds, refs, cfg.eval.task, cfg.eval.metrics, cfg.eval.regex,
                                                 scorer, cfg.eval.json_schema),
               **tool_metrics(preds, refs, [bool(a.get("tool_calls")) for a in answers],
                              [bool(out[h]["called"]) for h in hashes])}
    log.info("evaluate: %s %s", name, {k: round(v, 4) for k, v in metrics.items()})
    return {"metrics": metrics, "predictions": preds, "actors": len({r["actor"] for r in out.values()})}


def _generated_under(cfg: PipelineConfig) -> str:
    """What the answers were held to, so figures are compared with the like: a schema, the tools, or nothing."""
    if cfg.eval.constrained and cfg.eval.json_schema is not None:
        return "eval.json_schema"
    return "strict tool calls" if cfg.serve.strict_tools else "free"


def check_generation(cfg: PipelineConfig) -> None:
    """ConfigErrors naming the key, before any actor starts, where answers cannot be generated as configured:
    eval.constrained's schema must be one a grammar can follow, and serve.strict_tools (answers held to
    each row's tools, as on the endpoint) needs xgrammar where the actors run, as eval.constrained does."""
    from ray_qlora.structured import check_installed

    if cfg.eval.constrained and cfg.eval.json_schema is not None:
        check_schema_followable(cfg.eval.json_schema)
    if cfg.serve.strict_tools:
        check_installed("serve.strict_tools", "evaluation holds calls to their tools")


def check_schema_followable(schema: dict[str, Any]) -> None:
    """A ConfigError naming eval.json_schema before any actor starts, if constrained generation cannot follow it."""
    from ray_qlora.structured import SchemaError, check_followable

    try:
        check_followable(schema)
    except SchemaError as err:
        key = "eval.constrained" if err.missing_library else "eval.json_schema"
        raise ConfigError(f"invalid config: {key}: {err}") from None


def format_table(report: dict[str, Any]) -> str:
    cols = [c for c in ("base", "tuned", "adapter") if c in report]
    lines = [f"{'metric':<18}" + "".join(f"{c:>10}" for c in cols) + f"{'delta':>10}"]
    for k in report["tuned"]:
        pct = k != "eval_loss"
        fmt = (lambda x: f"{x:>9.1%} ") if pct else (lambda x: f"{x:>10.4f}")
        b, t = report["base"][k], report["tuned"][k]
        delta = f"{(t - b) * (100 if pct else 1):>+9.{1 if pct else 4}f}{'pp' if pct else ''}"
        lines.append(f"{k:<18}" + "".join(fmt(report[c][k]) for c in cols) + delta)
    return "\n".join(lines)


def _summary_md(report: dict[str, Any]) -> str:
    """summary.md: the table, then prompts with the reference and each model's answer side by side."""
    cols = [c for c in ("base", "tuned", "adapter") if c in report]
    lines = ["# Evaluation: base vs tuned", "", f"{report['examples']} held-out examples; "
             f"generated by {report['actors']} actor(s) per model"
             f"{'' if report.get('generated_under', 'free') == 'free' else ' under ' + report['generated_under']}.",
             "",
             "| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for k in report["tuned"]:
        fmt = (lambda x: f"{x:.4f}") if k == "eval_loss" else (lambda x: f"{x:.1%}")
        lines.append(f"| {k} | " + " | ".join(fmt(report[c][k]) for c in cols) + " |")
    if "merged_vs_adapter_agreement" in report:
        lines += ["", f"Merged and unmerged (base + adapter) gave the same answer on "
                      f"{report['merged_vs_adapter_agreement']:.1%} of prompts."]
    lines += ["", "## Samples", ""]
    cell = lambda s: str(s).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    lines += ["| prompt | reference | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for s in report["samples"]:
        lines.append(f"| {cell(s['prompt'])} | {cell(s['reference'])} | "
                     + " | ".join(cell(s.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], png_uri: str, cfg: PipelineConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in report["base"] if k != "eval_loss"]
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(keys)), 4))
    xs = range(len(keys))
    ax.bar([x - 0.2 for x in xs], [report["base"][k] * 100 for k in keys], 0.4, label="base")
    ax.bar([x + 0.2 for x in xs], [report["tuned"][k] * 100 for k in keys], 0.4, label="tuned")
    ax.set_xticks(list(xs), keys, rotation=15)
    ax.set_ylabel("% of held-out examples")
    ax.set_ylim(0, 118)
    ax.set_title(f"base vs tuned (eval loss {report['base']['eval_loss']:.3f} -> {report['tuned']['eval_loss']:.3f})")
    ax.legend(loc="upper center", ncol=2)
    storage.write_figure(fig, png_uri, cfg.storage)


def evaluate(cfg: PipelineConfig, run: storage.RunPaths, merge_result: dict[str, Any] | None = None,
             adapter_uri: str | None = None) -> dict[str, Any]:
    """Score the base and the merged model (and the unmerged adapter if asked); write the report files."""
    from ray_qlora.model_card import write_card

    scorer = load_scorer(cfg.eval.scorer) if cfg.eval.scorer else None
    check_generation(cfg)
    table = eval_rows(cfg, run)
    base = _score("base", cfg, table, "base", scorer=scorer)
    tuned = _score("tuned", cfg, table, run.merged, scorer=scorer)
    report: dict[str, Any] = {"examples": table.num_rows, "actors": tuned["actors"],
                              "generated_under": _generated_under(cfg),
                              "base": base["metrics"], "tuned": tuned["metrics"]}
    preds = {"base": base["predictions"], "tuned": tuned["predictions"]}
    if cfg.eval.compare_adapter and adapter_uri:
        adapter = _score("adapter", cfg, table, "base", adapter_uri, scorer)
        report["adapter"], preds["adapter"] = adapter["metrics"], adapter["predictions"]
        report["merged_vs_adapter_agreement"] = (
            sum(a == b for a, b in zip(adapter["predictions"], tuned["predictions"])) / max(1, table.num_rows))
    msgs = [json.loads(m) for m in table.column("messages").to_pylist()]
    report["samples"] = [{"prompt": m[-2]["content"] if len(m) > 1 else "", "reference": reference(m[-1]),
                          **{k: v[i] for k, v in preds.items()}} for i, m in enumerate(msgs[:cfg.eval.samples])]
    storage.write_json(run.report, report, cfg.storage)
    storage.write_json(storage.join(run.eval_dir, "predictions.json"),
                       [{"content_hash": h, **{k: v[i] for k, v in preds.items()}}
                        for i, h in enumerate(table.column("content_hash").to_pylist())], cfg.storage)
    storage.write_bytes(storage.join(run.eval_dir, "summary.md"), _summary_md(report).encode(), cfg.storage)
    _plot(report, storage.join(run.eval_dir, "base_vs_tuned.png"), cfg)
    if merge_result is not None:
        write_card(cfg, run, run.run_id, merge_result, report)
    report["table"] = format_table(report)
    log.info("evaluate:\n%s", report["table"])
    if not all(math.isfinite(v) for v in report["tuned"].values()):
        raise RuntimeError("evaluate: the tuned model produced non-finite metrics")
    return report
