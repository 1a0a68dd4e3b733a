"""One pipeline config, from a YAML file to every stage.

Each concern is a small pydantic model; ``PipelineConfig`` combines them.
Unknown keys are rejected (a typo must not silently fall back to a default)
and every error names the dotted key the user has to fix. Secrets never live
here: S3 credentials come from the environment (see ``storage.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ray_qlora import env_refs
from ray_qlora.errors import UserError

__all__ = [
    "ADAPTER_NAME",
    "ConfigError",
    "PipelineConfig",
    "load_config",
    "parse_config",
    "parse_overrides",
    "tunable_path",
]


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message lists every key to fix."""


FormatName = Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Strict):
    output_uri: str = Field(
        description="Where run folders go: s3://bucket/prefix, file:///path or a plain path.")
    run_id: str | None = Field(
        None, description="Name of the run folder; a timestamp when unset.")
    seed: int = Field(42, description="Seeds the split, the trials and sampling.")

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or v.startswith(".")):
            raise ValueError("must be a non-empty name without '/' and not starting with '.'")
        return v


class StorageConfig(_Strict):
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, moto, Ceph...); env AWS_ENDPOINT_URL when unset.")
    region: str = Field("us-east-1", description="S3 region.")


class RayConfig(_Strict):
    address: str | None = Field(
        None, description="Cluster to join ('auto', 'ray://...'); a local Ray is started when unset.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (ignored when joining a cluster).")


class SourceConfig(_Strict):
    """One input: a file, a folder or a glob, local or s3://, with a mixing weight."""

    uri: str = Field(description="File, folder or glob (s3://bucket/raw/*.jsonl.gz) of instruction data.")
    weight: float = Field(
        1.0, gt=0.0,
        description="How often this source's train examples are used: 2.0 twice each, 0.5 a seeded half.")
    format: FormatName | None = Field(None, description="Row format of this source; data.format when unset.")


class DedupConfig(_Strict):
    exact: bool = Field(True, description="Drop conversations equal after normalising case and whitespace.")
    near: bool = Field(True, description="Drop near-duplicates found by MinHash LSH (datasketch).")
    near_threshold: float = Field(
        0.9, gt=0.0, le=1.0,
        description="Estimated Jaccard similarity of word 3-grams above which rows are near-duplicates; "
                    "high by default so templated rows that differ in their facts are kept.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (precision vs speed).")
    shingle_size: int = Field(3, ge=1, le=16, description="Words per shingle.")


def _or_boolean(schema: dict[str, Any]) -> None:
    """JSON schema of a section that also accepts true/false (see DataConfig._dedup_bool)."""
    ref = {k: schema.pop(k) for k in ("$ref", "allOf") if k in schema}
    schema["anyOf"] = [ref, {"type": "boolean"}]


class DataConfig(_Strict):
    input_uris: list[str] = Field(
        default_factory=list, description="Files, folders or globs of .jsonl/.json/.parquet (optionally .gz/.zst).")
    sources: list[SourceConfig] = Field(
        default_factory=list, description="Inputs with per-source mixing weight and format; adds to input_uris.")
    format: FormatName = Field("auto", description="Row format; 'auto' detects it per row.")
    allow_text: bool = Field(
        False, description="Accept plain {'text': ...} rows (continued pre-training, every token labelled); "
                           "otherwise they are quarantined.")
    chat_template: str | None = Field(
        None, description="'chatml', 'llama-3', or a Jinja template; replaces the tokenizer's own, and is "
                          "required when the tokenizer has none. A template that writes no tools, tool calls "
                          "or results gets ray-qlora's Hermes tool front (see README, tool use).")
    system_prompt: str | None = Field(
        None, description="System message added to rows that have none.")
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of rows held out for eval.")
    max_seq_length: int = Field(512, ge=8, description="Token limit per example (and per packed row).")
    length_policy: Literal["quarantine", "truncate"] = Field(
        "quarantine", description="What to do with an example over max_seq_length.")
    dedup: DedupConfig = Field(
        DedupConfig(), json_schema_extra=_or_boolean,
        description="Duplicate removal before the split; 'false' switches both kinds off.")
    packing: bool | Literal["auto"] = Field(
        "auto", description="Pack train examples into rows of max_seq_length (best-fit); attention stays "
                            "within each example. 'auto': packed when the cluster has GPUs.")
    num_actors: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Row-processing actors (one tokenizer each); 'auto' scales from 1 to the "
                            "cluster's CPUs.")
    batch_size: int = Field(2048, ge=1, description="Rows per Ray Data block in row processing.")
    split_bytes: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="JSONL (gzip/zstd too) and Parquet files larger than this are read in parts of about "
                            "this many (compressed) bytes, each by its own actor task; 0 reads each file whole. "
                            "'auto': the input's bytes over 2 parts per cluster CPU, kept between 1 and 64 MiB.")
    cache: bool = Field(True, description="Reuse an earlier prepare of the same inputs and settings.")

    @field_validator("dedup", mode="before")
    @classmethod
    def _dedup_bool(cls, v: Any) -> Any:
        # `dedup: false` (the first config format) switches both kinds off
        return {"exact": v, "near": v} if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _some_input(self) -> "DataConfig":
        if not self.input_uris and not self.sources:
            raise ValueError("give data.input_uris or data.sources (at least one input)")
        return self

    def all_sources(self) -> list[SourceConfig]:
        """input_uris and sources as one list of sources, in config order."""
        return [SourceConfig(uri=u) for u in self.input_uris] + list(self.sources)


class QuantizationConfig(_Strict):
    load_in_4bit: bool = Field(True, description="QLoRA: freeze the base in 4-bit.")
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type: 'nf4' (NormalFloat, QLoRA's choice for normally distributed "
                           "weights) or 'fp4'.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Matmul dtype; 'auto': bfloat16 on GPU, float32 on CPU (bf16 is emulated there).")


class ModelConfig(_Strict):
    base: str = Field(
        "smollm2-135m-instruct",
        description="'smollm2-135m-instruct' (embedded), a local folder, an s3:// folder, or a hub id.")
    quantization: QuantizationConfig = Field(
        QuantizationConfig(), description="How the frozen base is quantized for training (bitsandbytes).")
    allow_pickle: bool = Field(
        False, description="Load .bin/.pt weights (pickle: loading one can run code). Off: safetensors only.")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with a model (auto_map). Off unless you trust its source.")


class LoraConfig(_Strict):
    r: int = Field(16, ge=1, description="Rank of the adapter matrices: higher can learn more, at more memory "
                                         "and time per step.")
    alpha: int = Field(32, ge=1, description="Scale of the adapter's update (alpha / r); commonly 2 x r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter's input; raise it when a "
                                                             "small dataset overfits.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", json_schema_extra={"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        description="Modules that get adapters: 'all-linear', a list of module names (or dotted suffixes of them, "
                    "as peft matches), or those names comma-separated (how a search choice gives them). A name "
                    "the base lacks is refused by `plan` and before any trial.")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "all-linear":
            return [m.strip() for m in v.split(",") if m.strip()]
        return v

    @field_validator("target_modules")
    @classmethod
    def _some_module(cls, v: str | list[str]) -> str | list[str]:
        if not v:  # peft would build an adapter with nothing to train
            raise ValueError("name at least one module, or 'all-linear'")
        return v


class TrainingConfig(_Strict):
    num_epochs: float = Field(1.0, gt=0, description="Passes over the train split (fractions allowed); "
                                                    "max_steps overrides it when set.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use num_epochs).")
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        8, description="Per-device micro-batch (rows); 'auto': the largest the memory planner fits on the "
                       "trial's GPU, capped at max_auto_batch_size (8 on a CPU).")
    max_auto_batch_size: int = Field(16, ge=1, description="Cap on an 'auto' micro-batch.")
    optimizer: Literal["adamw_torch", "paged_adamw_8bit"] = Field(
        "adamw_torch", description="'paged_adamw_8bit' keeps AdamW's moments in 8 bits (CUDA only).")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches per optimizer step (effective batch = batch_size x this): a larger "
                             "batch without more memory.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate of the adapter weights, reached "
                                                         "after warmup.")
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = Field(
        "cosine", description="How the learning rate changes after warmup.")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Share of the steps over which the learning "
                                                                  "rate ramps up from 0.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay; a regulariser against overfitting.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="Recompute activations in backward; 'auto': off when the planner says they fit "
                            "on the trial's GPU (about 1.8x faster), off on a CPU (recompute costs more there).")
    use_liger: bool | Literal["auto"] = Field(
        "auto", description="liger-kernel's fused Triton kernels (the 'gpu' extra); 'auto': on when installed "
                            "and the trial has a GPU.")
    eval_steps: int = Field(10, ge=1, description="Evaluate and report to Tune every N steps.")
    eval_max_examples: int | None = Field(
        None, ge=1, description="Held-out examples scored at each in-training eval (all when unset).")
    logging_steps: int = Field(5, ge=1, description="Log the training loss every N steps.")


class SearchDim(_Strict):
    """One search dimension: either a list of values or a numeric range."""

    values: list[Any] | None = Field(None, description="Grid values (every one is tried).")
    choice: list[Any] | None = Field(None, description="Values sampled at random.")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high] sampled log-uniformly.")
    uniform: tuple[float, float] | None = Field(None, description="[low, high] sampled uniformly.")
    randint: tuple[int, int] | None = Field(None, description="[low, high] integers, both ends included.")

    @model_validator(mode="after")
    def _exactly_one(self) -> "SearchDim":
        set_ = [k for k in ("values", "choice", "loguniform", "uniform", "randint") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError("give exactly one of values, choice, loguniform, uniform, randint")
        if self.randint is not None and self.randint[0] > self.randint[1]:
            raise ValueError("randint: low must not be above high")
        for k in ("loguniform", "uniform"):
            rng = getattr(self, k)
            if rng is not None and not rng[0] < rng[1]:
                raise ValueError(f"{k}: low must be below high")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: low must be > 0")
        return self

    def examples(self) -> list[Any]:
        """Values this dimension can give, ends of ranges included: what validation tries."""
        for listed in (self.values, self.choice):
            if listed is not None:
                return list(listed)
        return list(self.loguniform or self.uniform or self.randint or ())


# Short names for the most tuned keys; any other field of `training` or `lora` is tunable by its dotted
# name (training.warmup_ratio, lora.target_modules...).
TUNABLE_KEYS: dict[str, tuple[str, str]] = {
    "learning_rate": ("training", "learning_rate"),
    "num_epochs": ("training", "num_epochs"),
    "batch_size": ("training", "batch_size"),
    "gradient_accumulation_steps": ("training", "gradient_accumulation_steps"),
    "warmup_ratio": ("training", "warmup_ratio"),
    "weight_decay": ("training", "weight_decay"),
    "lora_r": ("lora", "r"),
    "lora_alpha": ("lora", "alpha"),
    "lora_dropout": ("lora", "dropout"),
}


class AshaConfig(_Strict):
    enabled: bool = Field(True, description="Stop trials that trail the others early (ASHA); off: every trial "
                                            "runs to the end.")
    grace_period: int = Field(1, ge=1, description="Reports before a trial may be stopped.")
    reduction_factor: int = Field(2, ge=2, description="At each rung only the best 1/N of trials go on; higher "
                                                       "stops more trials, sooner.")
    synchronous: bool = Field(
        False, description="Judge every trial at each rung before any goes on (synchronous successive halving): "
                           "trials wait, paused, for the others; fewer steps than ASHA when trials outnumber the "
                           "slots. Grid and random sampling only.")


class MlflowConfig(_Strict):
    enabled: bool = Field(False, description="Log every trial (params, metrics per report) to MLflow.")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking server or database; env MLFLOW_TRACKING_URI, else "
                          "sqlite:///mlflow.db in the working directory.")
    experiment: str = Field("ray-qlora", description="MLflow experiment the trials are logged under.")


class TuneConfig(_Strict):
    search_space: dict[str, SearchDim] = Field(
        default_factory=dict,
        description=f"What the trials vary, by key: {', '.join(TUNABLE_KEYS)}, or any training.<field> or "
                    "lora.<field>.")
    num_samples: int = Field(1, ge=1, description="Samples of the space (grid values multiply it).")
    max_concurrent_trials: int = Field(2, ge=1, description="Trials run at once (the cluster's CPUs and GPUs "
                                                            "may allow fewer).")
    cpus_per_trial: int = Field(1, ge=1, description="CPUs a trial reserves (its torch threads on a CPU).")
    borrow_idle_cpus: bool = Field(
        True, description="On a CPU, a trial also runs threads on CPUs no one holds on its node (those of "
                          "trials ASHA stopped, with none left to start), and gives them back at its next "
                          "step once Ray places work there.")
    gpus_per_trial: float | Literal["auto"] = Field(
        "auto", description="GPUs a trial reserves (a fraction shares one); 'auto': 1 when the cluster has GPUs, "
                            "else 0.")
    metric: Literal["eval_loss", "eval_mean_token_accuracy"] = Field(
        "eval_loss", description="What picks the best trial and drives ASHA (loss: lower is better; "
                                 "token accuracy: higher).")
    asha: AshaConfig = Field(AshaConfig(), description="Early stopping of trials that trail (ASHA scheduler).")
    search_algorithm: Literal["random", "optuna"] = Field(
        "random", description="'random': grid and random sampling (Tune's default); 'optuna': Optuna's TPE "
                              "through Tune (the 'search' extra).")
    time_budget_s: float | None = Field(None, gt=0, description="Stop the search after this many seconds.")
    max_failures: int = Field(
        2, ge=0, description="Retries of a trial whose worker died; it resumes from its last checkpoint.")
    mlflow: MlflowConfig = Field(MlflowConfig(), description="Experiment tracking of the trials in MLflow.")
    cluster_autoscales: bool = Field(
        False, description="The cluster adds nodes on demand: do not refuse a trial no current node can hold.")
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="Memory of the trials' GPUs for the pre-flight plan; measured on a GPU "
                                "node when unset.")

    @property
    def mode(self) -> Literal["min", "max"]:
        return "min" if self.metric.endswith("loss") else "max"

    @field_validator("search_space")
    @classmethod
    def _known_keys(cls, v: dict[str, SearchDim]) -> dict[str, SearchDim]:
        unknown = sorted(k for k in v if tunable_path(k) is None)
        if unknown:
            raise ValueError(f"unknown search key(s) {unknown}; tunable: any training.* or lora.* key, "
                             f"or {sorted(TUNABLE_KEYS)}")
        return v

    @model_validator(mode="after")
    def _searcher_fits_space(self) -> "TuneConfig":
        if self.search_algorithm == "optuna" and self.asha.enabled and self.asha.synchronous:
            raise ValueError("asha.synchronous needs every trial of the search known up front; Optuna proposes "
                             "them as results come in: use search_algorithm: random, or asha.synchronous: false")
        if self.search_algorithm == "optuna":
            grid = sorted(k for k, d in self.search_space.items() if d.values is not None)
            if grid:
                raise ValueError(f"search_space {grid}: grid 'values' cannot be used with search_algorithm: "
                                 "optuna (Optuna samples); use 'choice'")
        return self


def tunable_path(key: str) -> tuple[str, str] | None:
    """(section, field) a search key sets: a short name, or training.<field> / lora.<field>."""
    if key in TUNABLE_KEYS:
        return TUNABLE_KEYS[key]
    section, _, name = key.partition(".")
    model = {"training": TrainingConfig, "lora": LoraConfig}.get(section)
    return (section, name) if model is not None and name in model.model_fields else None


class MergeConfig(_Strict):
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the 16-bit base the adapter is merged into and saved as.")
    verify: bool = Field(True, description="Before publishing, check the merged model's greedy outputs against "
                                           "the unmerged adapter's on eval prompts.")
    verify_prompts: int = Field(8, ge=1, description="Eval prompts the merged model is checked on.")
    verify_max_new_tokens: int = Field(32, ge=1, description="Tokens generated per prompt in the check.")
    verify_min_match: float = Field(
        0.85, ge=0.0, le=1.0,
        description="Share of prompts whose greedy output must equal the unmerged model's; rounding the "
                    "merged weights to 16 bits may flip a near-tie token, a wrong merge flips most.")


METRICS = ("exact_match", "normalized_match", "valid_json", "json_match", "field_accuracy", "regex_match",
           "schema_valid")


class EvalConfig(_Strict):
    max_examples: int | None = Field(
        64, ge=1, description="Held-out examples generated on; null: the whole eval split.")
    max_new_tokens: int = Field(64, ge=1, description="Most tokens generated per answer; must cover the "
                                                      "longest expected answer.")
    batch_size: int = Field(8, ge=1, description="Prompts per generate call in an actor.")
    task: Literal["auto", "exact_match", "json"] = Field(
        "auto", description="'json' adds valid-JSON rate and field accuracy; 'auto' picks it when answers are JSON.")
    metrics: list[Literal[METRICS]] | None = Field(  # type: ignore[valid-type]
        None, description=f"Metrics to report, from {', '.join(METRICS)}; null: chosen by eval.task.")
    regex: str | None = Field(None, description="Pattern a prediction must fully match, for regex_match.")
    json_schema: dict[str, Any] | None = Field(
        None, description="A JSON schema (a mapping in the YAML) answers must follow: adds schema_valid, the share "
                          "of answers that parse and validate.")
    constrained: bool = Field(
        False, description="Generate under eval.json_schema, as a request with that response_format is served: "
                           "the figures the endpoint gives clients who ask for the schema.")
    scorer: str | None = Field(
        None, description="A user metric 'module:function', called as f(prediction, reference) -> float in [0, 1].")
    num_actors: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Generation actors (one model each); 'auto': one per GPU, else one per "
                            "cpus_per_actor CPUs.")
    cpus_per_actor: int = Field(1, ge=1, description="CPUs a generation actor reserves (its torch threads).")
    compare_adapter: bool = Field(
        False, description="Also score the unmerged base + adapter on the same prompts (merged should equal it).")
    samples: int = Field(8, ge=0, description="Side-by-side samples in the markdown summary.")

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        import re

        if v is not None:
            try:
                re.compile(v)
            except re.error as err:
                raise ValueError(f"not a valid regular expression: {err}") from None
        return v

    @field_validator("scorer")
    @classmethod
    def _module_function(cls, v: str | None) -> str | None:
        if v is not None and (v.count(":") != 1 or not all(v.split(":"))):
            raise ValueError("write it as 'package.module:function'")
        return v

    @field_validator("json_schema")
    @classmethod
    def _is_a_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            from jsonschema import SchemaError, validators

            try:
                validators.validator_for(v).check_schema(v)
            except SchemaError as err:
                where = "/".join(str(p) for p in err.absolute_path)
                raise ValueError(f"not a valid JSON schema{f' at {where}' if where else ''}: {err.message}") from None
        return v

    @model_validator(mode="after")
    def _regex_given(self) -> "EvalConfig":
        if self.metrics and "regex_match" in self.metrics and not self.regex:
            raise ValueError("metrics has regex_match: set eval.regex to the pattern")
        if self.metrics and "schema_valid" in self.metrics and self.json_schema is None:
            raise ValueError("metrics has schema_valid: set eval.json_schema to the schema")
        if self.constrained and self.json_schema is None:
            raise ValueError("constrained generation needs the schema: set eval.json_schema")
        return self


# One pattern for adapter names, from the config, the CLI and (later) requests:
# nothing that could be a path or a URI.
ADAPTER_NAME = r"[a-z0-9][a-z0-9_-]{0,62}"
ADAPTER_NAME_RULE = "1-63 lower-case letters, digits, '-' or '_', starting with a letter or digit"


class AdaptersConfig(_Strict):
    publish: bool = Field(True, description="Publish the best adapter of tune to <output_uri>/adapters/.")
    name: str | None = Field(
        None, description="Registry name the adapter is published under; the run id when unset.")
    top_k: int = Field(1, ge=1, description="Also publish the runners-up as <name>-rank2 ... <name>-rank<k>.")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str | None) -> str | None:
        import re

        if v is not None and not re.fullmatch(ADAPTER_NAME, v):
            raise ValueError(f"{v!r} is not a valid adapter name ({ADAPTER_NAME_RULE})")
        return v


class ExportConfig(_Strict):
    gguf: Literal["f16", "q8_0"] | None = Field(
        "f16", description="Write <merged>/model-<type>.gguf for llama.cpp/Ollama (Llama-architecture models); "
                           "null: no GGUF.")
    verify_gguf: bool = Field(True, description="Reload the GGUF with transformers and compare logits.")
    gguf_max_logit_diff: float | None = Field(
        None, gt=0, description="Largest logit difference (relative to the largest logit) the GGUF may show "
                                "against the merged model; null: 0.01 for f16, 0.05 for q8_0 (measured on "
                                "SmolLM2-135M: 0 and 0.021).")
    ollama: bool = Field(True, description="Write an Ollama Modelfile next to the merged model and in the adapter.")


# How often a Ray Serve replica pushes its load to the autoscaler
# (ray.serve.config.DEFAULT_METRICS_INTERVAL_S; a test pins it to the installed
# Ray). A look-back window no longer than this averages one stale push or
# none; Ray 2.60 only warns, in the controller's log, and says a later release
# will refuse it.
SERVE_METRICS_PUSH_INTERVAL_S = 10.0


class AutoscalingConfig(_Strict):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas; 0 frees the GPU when idle (the next "
                                                   "request waits for a replica to load).")
    max_replicas: int = Field(2, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(4.0, gt=0, description="Requests in flight per replica the autoscaler "
                                                                  "aims at; lower adds replicas sooner.")
    upscale_delay_s: float = Field(30.0, ge=0, description="Load must stay high this long before a replica is added.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Load must stay low this long before one is removed.")
    look_back_period_s: float = Field(
        30.0, description="Window the ongoing-request average is taken over; longer than the 10 s at which "
                          "replicas report their load.")

    @field_validator("look_back_period_s")
    @classmethod
    def _longer_than_a_push(cls, v: float) -> float:
        if v <= SERVE_METRICS_PUSH_INTERVAL_S:
            raise ValueError(f"must be greater than {SERVE_METRICS_PUSH_INTERVAL_S:g} s, the interval at which "
                             f"Ray Serve replicas report their load (got {v:g}); a shorter window averages "
                             f"one stale report or none")
        return v

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self


class ServeConfig(_Strict):
    host: str = Field("127.0.0.1", description="Interface the HTTP proxy listens on; 0.0.0.0 accepts other "
                                               "machines.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the endpoint.")
    route_prefix: str = Field("/", description="URL path of the app (the API is <prefix>/v1); one per model "
                                               "deployed side by side.")
    model_name: str | None = Field(None, description="Name clients send as 'model'; the run id when unset.")
    num_replicas: int | None = Field(None, ge=1, description="Fixed replicas; excludes autoscaling.")
    autoscaling: AutoscalingConfig | None = Field(
        None, description="Scale replicas with load; unset: num_replicas fixed replicas (1 when that is unset too).")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs a replica reserves.")
    gpus_per_replica: float | Literal["auto"] = Field(
        "auto", description="GPUs a replica reserves; 'auto': 1 when the cluster has GPUs, else 0.")
    max_new_tokens: int = Field(
        256, ge=1, description="Most tokens a request may ask for (larger max_tokens: 400); also the default.")
    max_batch_size: int = Field(
        8, ge=1, description="Requests batched together, and rows (a request's n choices are n rows) per "
                             "generate call on the transformers engine; vLLM's max_num_seqs.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body; larger: 400.")
    body_timeout_s: float = Field(
        30.0, gt=0, description="Seconds a replica waits for the next part of a request body; longer: 408, which "
                                "clients such as the openai SDK resend.")
    max_context: int | None = Field(
        None, ge=16, description="Prompt + completion tokens a request may use; null: the model's context.")
    auth: Literal["api_key", "none"] = Field(
        "api_key", description="'api_key': requests need 'Authorization: Bearer <key>'; 'none' opens the "
                               "endpoint to anyone who can reach it (set it on purpose, e.g. the local demo).")
    api_key_env: str = Field(
        "RAY_QLORA_API_KEYS", description="Environment variable holding the accepted keys, comma-separated.")
    api_key_file: str | None = Field(
        None, description="A file of accepted keys, one per line (e.g. a mounted Kubernetes Secret).")
    max_adapters: int = Field(
        4, ge=0, description="Registry adapters a replica keeps loaded on its shared base (LRU); requests name "
                             "them as 'model': '<name>' or '<name>@v<N>'. 0: the merged model only.")
    strict_tools: bool = Field(
        False, description="Hold every tool call the model chooses to make (tool_choice 'auto') to the called "
                           "function's parameters, as OpenAI's per-function 'strict: true' does for one request: "
                           "once the model opens <tool_call>, only an offered name and arguments that follow its "
                           "schema can be generated. A function sent with 'strict: false' is left free. Calls "
                           "must be written as Hermes tags (the tool front's, and the vLLM engine's hermes "
                           "parser); forced calls are always held. Evaluation holds held-out tool rows' calls the same "
                           "way, so its call figures are the endpoint's.")
    engine: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="What generates: 'vllm' (Ray Serve LLM with vLLM: continuous batching, paged KV "
                            "cache, LoRA), 'transformers' (generate() in the replica; the fallback where vLLM "
                            "cannot be installed or cannot run the model), or 'auto': vLLM when it is installed "
                            "and supports the model here, else transformers (the deploy log says why).")
    compile: bool | Literal["auto"] = Field(
        "auto", description="vLLM only: compile the model and capture CUDA graphs. 'auto': on GPU yes; on CPU "
                            "no, since compiling adds about a minute to every replica's start.")
    kv_cache_gb: float = Field(
        1.0, gt=0, description="vLLM on CPU only: memory for the KV cache per replica (on GPU vLLM sizes it "
                               "from the free GPU memory).")
    max_lora_rank: int = Field(
        64, ge=1, description="vLLM only: the largest LoRA rank an adapter may have (vLLM reserves buffers "
                              "for it).")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="vLLM only: engine arguments passed as given (e.g. "
                                          "gpu_memory_utilization, tensor_parallel_size); they override the "
                                          "ones ray-qlora derives.")
    app_name: str | None = Field(
        None, description="Ray Serve application name; 'ray-qlora-<model name>' when unset, so deploying "
                          "another run does not replace this one.")

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> "ServeConfig":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set num_replicas or autoscaling, not both")
        return self


class PipelineConfig(_Strict):
    run: RunConfig = Field(description="Where the run's outputs go, its name and seed.")
    storage: StorageConfig = Field(
        StorageConfig(), description="Object store connection (credentials come from the environment).")
    ray: RayConfig = Field(RayConfig(), description="The Ray cluster to join, or a local one.")
    data: DataConfig = Field(description="Inputs, and how prepare turns rows into tokenized train/eval shards.")
    model: ModelConfig = Field(ModelConfig(), description="The base model and how it is loaded.")
    lora: LoraConfig = Field(LoraConfig(), description="Shape of the LoRA adapter trained on the frozen base.")
    training: TrainingConfig = Field(TrainingConfig(), description="One trial's training loop.")
    tune: TuneConfig = Field(TuneConfig(), description="The search over trials (Ray Tune): space, resources, "
                                                       "early stopping.")
    merge: MergeConfig = Field(MergeConfig(), description="Merging the best adapter into a 16-bit base, and its "
                                                          "check.")
    eval: EvalConfig = Field(EvalConfig(), description="Base vs tuned model on the held-out split.")
    adapters: AdaptersConfig = Field(AdaptersConfig(), description="Publishing adapters to the registry.")
    export: ExportConfig = Field(ExportConfig(), description="GGUF and Ollama files written with the merged "
                                                             "model.")
    serve: ServeConfig = Field(ServeConfig(), description="The OpenAI-compatible endpoint (Ray Serve).")

    @model_validator(mode="after")
    def _search_values_valid(self) -> "PipelineConfig":
        for key, dim in self.tune.search_space.items():
            section, name = tunable_path(key)  # type: ignore[misc]
            current = getattr(self, section).model_dump()
            for value in dim.examples():
                try:
                    type(getattr(self, section)).model_validate({**current, name: value})
                except ValidationError as err:
                    msg = err.errors()[0]["msg"]
                    raise ValueError(f"tune.search_space.{key}: {value!r} is not a valid {section}.{name} "
                                     f"({msg})") from None
        return self

    def with_overrides(self, overrides: dict[str, Any]) -> "PipelineConfig":
        """A copy with ``{"training.learning_rate": 1e-3, ...}`` applied and re-validated."""
        return parse_config(_apply_overrides(self.model_dump(), overrides))


def _apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Put each dotted key's value into a config dict (sections created as needed; validation comes after)."""
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"invalid config: {dotted}: {p!r} is a value, not a section")
        node[leaf] = value
    return data


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; unknown keys are rejected)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {msg}" if key == "<root>" else f"  {key}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def parse_config(data: dict[str, Any]) -> PipelineConfig:
    """Validate a config dict, raising ConfigError that names every bad key."""
    if not isinstance(data, dict):
        raise ConfigError("invalid config: the top level must be a mapping")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["training.learning_rate=1e-4", ...]`` (the CLI's --set) -> {dotted key: value parsed as YAML}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or "." not in key:
            raise ConfigError(f"invalid --set {item!r}: write section.key=value, e.g. training.learning_rate=1e-4")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"invalid --set {item!r}: the value is not valid YAML: {err}") from None
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config file, replace ${ENV} references in its values, apply --set overrides, and validate it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid config: {p} is not valid YAML: {err}") from None
    if not isinstance(data or {}, dict):
        raise ConfigError(f"invalid config: the top level of {p} must be a mapping")
    try:
        data = env_refs.expand(data or {})
    except env_refs.UnsetVariable as err:
        raise ConfigError(f"invalid config: {err}") from None
    return parse_config(_apply_overrides(data, parse_overrides(overrides or [])))
