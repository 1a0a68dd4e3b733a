"""What one Tune trial runs: a QLoRA fine-tune with TRL's SFTTrainer.

The 4-bit base is frozen; only LoRA matrices train. Every ``eval_steps`` the
trial reports eval loss to Tune together with a checkpoint holding the
adapter alone (a few MB, never the base), so ASHA can stop weak trials and
the best checkpoint of the best trial is what ``merge`` picks up. Each
evaluation also sets the trial's Prometheus gauges (``ray_qlora_trial_*``
on the wire, tagged with the run id and Tune's trial name).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray_qlora import storage
from ray_qlora.config import PipelineConfig, parse_config, tunable_path

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback

    from ray_qlora.plan import ModelShape

__all__ = ["PACKED_COLUMN", "apply_trial_params", "build_trainer", "idle_cpus_callback", "is_packed", "load_split",
           "resolve_speed", "train_trial"]

log = logging.getLogger(__name__)

# The column a packed split has and an unpacked one lacks; named as TRL's collator reads it.
PACKED_COLUMN = "seq_lengths"


def apply_trial_params(cfg: PipelineConfig, params: dict[str, Any]) -> PipelineConfig:
    """The pipeline config with a trial's sampled values (lora_r, training.warmup_ratio...) put in place."""
    overrides = {".".join(path): v for k, v in params.items() if (path := tunable_path(k)) is not None}
    return cfg.with_overrides(overrides) if overrides else cfg


def load_split(uri: str, cfg: PipelineConfig) -> "Dataset":
    """A prepared split (Parquet shards) as a datasets.Dataset of input_ids/labels.

    A packed split also has ``seq_lengths`` (see ``ray_qlora.data.packing``),
    which is what tells ``build_trainer`` to train padding-free.
    """
    import pyarrow.dataset as pads
    from datasets import Dataset

    fs, path = storage.resolve(uri, cfg.storage)
    source = pads.dataset(path, filesystem=fs, format="parquet")
    columns = ["input_ids", "labels"] + ([PACKED_COLUMN] if PACKED_COLUMN in source.schema.names else [])
    return Dataset(source.to_table(columns=columns))


def is_packed(ds: "Dataset") -> bool:
    """Whether rows hold several examples each (they carry their lengths in ``seq_lengths``)."""
    return PACKED_COLUMN in (ds.column_names or [])


def _sft_args(cfg: PipelineConfig, output_dir: str, device: str, packed: bool = False,
              checkpoints: bool = False) -> Any:
    """TRL's config for a trial; ``packed`` switches to padding-free batches of pre-packed rows.

    Packed: TRL's collator flattens each batch into one row and restarts the
    position ids at every example (from ``seq_lengths``; unpacked eval rows
    restart per row), and passes no attention mask, so transformers builds a
    block-causal one from those positions. TRL's own dataset preparation is
    skipped: the rows are already tokenized, truncated and packed, and it
    would otherwise cut them to max_length. max_length is None because TRL
    refuses padding_free with a max_length it cannot enforce.
    """
    from trl import SFTConfig

    t = cfg.training
    if not isinstance(t.batch_size, int):
        raise ValueError("training.batch_size 'auto' must be resolved first (train.resolve_speed)")
    return SFTConfig(
        output_dir=output_dir,
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=float(t.warmup_ratio),  # a float below 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        activation_checkpointing=t.gradient_checkpointing is True,  # 'auto' is resolved by resolve_speed
        use_liger_kernel=t.use_liger is True,
        optim=t.optimizer,
        activation_checkpointing_kwargs={"use_reentrant": False},
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        logging_steps=t.logging_steps,
        # With checkpoints: one at each evaluation (adapter, optimizer, scheduler, RNG, step), handed to
        # Tune, which keeps them in the run's storage; see _TuneReport.
        save_strategy="steps" if checkpoints else "no",
        save_steps=t.eval_steps,
        save_total_limit=1,
        save_only_model=False,
        report_to="none",
        max_length=None if packed else cfg.data.max_seq_length,
        padding_free=packed,
        dataset_kwargs={"skip_prepare_dataset": True} if packed else None,
        bf16=device.startswith("cuda") and cfg.model.quantization.compute_dtype in ("auto", "bfloat16"),
        use_cpu=not device.startswith("cuda"),
        seed=cfg.run.seed,
        data_seed=cfg.run.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def resolve_speed(cfg: PipelineConfig, shape: "ModelShape", device: str,
                  gpu_bytes: float | None = None) -> tuple[PipelineConfig, list[str]]:
    """The config with the 'auto' speed settings decided for this device, and why each was.

    On a GPU the memory planner decides: checkpointing off when the
    activations fit (recomputing them costs a third more compute), the largest
    micro-batch that fits when batch_size is 'auto', liger's kernels when
    installed. On a CPU: no checkpointing (memory is rarely what binds there,
    time is), no liger (Triton needs a GPU), micro-batch of at most 8.
    """
    import importlib.util

    from ray_qlora.plan import local_gpu_bytes, plan_trial

    t = cfg.training
    why: list[str] = []
    gpu = device.startswith("cuda")
    liger = t.use_liger
    if liger == "auto":
        found = importlib.util.find_spec("liger_kernel") is not None
        liger = gpu and found
        why.append(f"liger kernels {'on' if liger else 'off'}: "
                   + ("installed and a GPU" if liger else "needs a GPU" if not gpu else "liger-kernel not installed"))
    ckpt, batch = t.gradient_checkpointing, t.batch_size
    if not gpu:
        if ckpt == "auto":
            ckpt = False
            why.append("checkpointing off: on a CPU recomputing activations costs more time than memory saved")
        if batch == "auto":
            batch = min(8, t.max_auto_batch_size)
            why.append(f"micro-batch {batch}: the CPU default")
    else:
        budget = gpu_bytes if gpu_bytes is not None else local_gpu_bytes() or 0.0
        wanted = batch if isinstance(batch, int) else 1  # an 'auto' batch needs at least one row to fit
        probe = plan_trial(cfg, shape, budget, checkpointing=False, liger=bool(liger), micro_batch=wanted)
        if ckpt == "auto":
            ckpt = (probe.max_micro_batch_without_checkpointing or 0) < wanted
            why.append(f"checkpointing {'on' if ckpt else 'off'}: the planner puts micro-batch {wanted} without "
                       f"it at {probe.total / 2**30:.1f} GiB of a {probe.budget / 2**30:.1f} GiB budget")
        if batch == "auto":
            fit = probe.max_micro_batch_with_checkpointing if ckpt else probe.max_micro_batch_without_checkpointing
            batch = max(1, min(t.max_auto_batch_size, fit or 1))
            why.append(f"micro-batch {batch}: the largest of at most {t.max_auto_batch_size} the planner fits "
                       f"in {probe.budget / 2**30:.1f} GiB with checkpointing {'on' if ckpt else 'off'}")
    resolved = cfg.with_overrides({"training.gradient_checkpointing": bool(ckpt), "training.use_liger": bool(liger),
                                   "training.batch_size": int(batch)})
    return resolved, why


def build_trainer(cfg: PipelineConfig, base_path: Path, train_ds: "Dataset", eval_ds: "Dataset",
                  output_dir: str, device: str, callbacks: list["TrainerCallback"] | None = None,
                  checkpoints: bool = False) -> "Trainer":
    """SFTTrainer over a 4-bit base with LoRA attached; the one place a trial's model is built."""
    from trl import SFTTrainer

    from ray_qlora.modeling import attach_lora, load_4bit_base, load_tokenizer
    from ray_qlora.plan import shape_from_config

    cfg, why = resolve_speed(cfg, shape_from_config(base_path), device)
    for reason in why:
        log.info("train: %s", reason)
    packed = _training_mode(train_ds, eval_ds, cfg.data.max_seq_length)
    tok = load_tokenizer(base_path, cfg.data.chat_template, trust_remote_code=cfg.model.trust_remote_code)
    model = load_4bit_base(base_path, cfg.model.quantization, device, trust_remote_code=cfg.model.trust_remote_code)
    model = attach_lora(model, cfg.lora, bool(cfg.training.gradient_checkpointing))
    args = _sft_args(cfg, output_dir, device, packed, checkpoints)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds,
                         eval_dataset=eval_ds, processing_class=tok, callbacks=callbacks or [])
    _adapters_to_fp32(trainer.model)
    return trainer


def _adapters_to_fp32(model: Any) -> None:
    """Keep the LoRA weights in fp32 (master weights), undoing SFTTrainer's bf16 cast of QLoRA adapters.

    TRL casts a quantized model's adapters to bf16 (the QLoRA paper's recipe).
    Three things go wrong with that here:

    - resume: a checkpoint's adapter comes back through peft's ``load_adapter``,
      which upcasts it to fp32, so a trial resumed after a rung pause, a dead
      worker or ``tune --resume`` would go on in another dtype than the run it
      continues (measured: its losses drift from the first resumed step);
    - CPU: compute is fp32 there, and peft would run every LoRA matmul in bf16,
      which CPUs without native bf16 emulate (a quarter of a 22 s demo step);
    - bf16 weights round away Adam updates below 1/256 of a weight, which the
      tail of a cosine schedule makes.

    With bf16 compute on a GPU, the Trainer's autocast still runs the LoRA
    matmuls in bf16; the planner already counts adapters at fp32. The
    optimizer does not exist yet (``train()`` builds it), so it sees fp32
    parameters from the start.
    """
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def _training_mode(train_ds: "Dataset", eval_ds: "Dataset", max_seq_length: int) -> bool:
    """True for padding-free training on packed rows; logs the mode and why."""
    if is_packed(train_ds):
        log.info("train: packed split (has %s): padding-free batches, positions restart at each example, "
                 "TRL's dataset preparation skipped (rows already tokenized, truncated and packed)", PACKED_COLUMN)
        return True
    if is_packed(eval_ds):
        # Padded batches ignore seq_lengths: packed eval examples would attend to each other.
        raise ValueError(f"the eval split is packed ({PACKED_COLUMN} column) but the train split is not; "
                         "eval must be unpacked, or both prepared the same way")
    log.info("train: unpacked split (no %s column): padded batches with an attention mask, "
             "TRL truncates to max_length=%d", PACKED_COLUMN, max_seq_length)
    return False


def _peak_memory_gib(device: str) -> float:
    """Peak accelerator memory of this process (GPU), or its peak resident memory (CPU)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# Prometheus gauges each trial sets at every evaluation (Ray exports a metric NAME as ray_NAME, so these are
# scraped as ray_qlora_trial_*; infra/monitoring/dashboards/training.json reads them). Key: the _metrics() entry.
_TRIAL_GAUGE_TAGS = ("run", "trial")
_trial_gauges: dict[str, Any] | None = None


def _cpu_threads(device: str) -> int | None:
    """The torch threads training runs on now (a CPU trial's, with any it borrowed); None on a GPU."""
    import torch

    return torch.get_num_threads() if device == "cpu" else None


def _get_trial_gauges() -> dict[str, Any]:
    """The trial gauges, created once per process; none (nothing exported) where Ray is not running."""
    global _trial_gauges
    if _trial_gauges is not None:
        return _trial_gauges
    try:
        import ray
        from ray.util.metrics import Gauge

        if not ray.is_initialized():  # a Ray metric needs a Ray worker or driver; maybe later in this process
            return {}
        tags = _TRIAL_GAUGE_TAGS
        _trial_gauges = {
            "eval_loss": Gauge("qlora_trial_eval_loss", description="Eval loss at the trial's last evaluation.",
                               tag_keys=tags),
            "tokens_per_s": Gauge("qlora_trial_tokens_per_second",
                                  description="Training tokens per second of the trial so far.", tag_keys=tags),
            "peak_memory_gib": Gauge("qlora_trial_peak_memory_gib",
                                     description="Peak GPU memory (on a CPU: peak resident memory) of the trial.",
                                     tag_keys=tags),
            "step": Gauge("qlora_trial_step", description="Optimizer step of the trial's last evaluation.",
                          tag_keys=tags),
        }
    except Exception as e:  # noqa: BLE001 - metrics are an extra; training goes on without them
        log.warning("train: trial metrics not exported (%s: %s)", type(e).__name__, e)
        _trial_gauges = {}
    return _trial_gauges


def _export_trial_metrics(metrics: dict[str, Any], run_id: str, trial: str) -> None:
    """Set the trial gauges from one evaluation's report; a value not known yet (None) is left as it was."""
    tags = {"run": run_id, "trial": trial}
    for key, gauge in _get_trial_gauges().items():
        if metrics.get(key) is not None:
            gauge.set(float(metrics[key]), tags=tags)


def _trial_name() -> str:
    """Tune's name of the running trial (train_trial_<id>), '' outside Tune."""
    try:
        from ray import tune

        return tune.get_context().get_trial_name() or ""
    except Exception:  # noqa: BLE001 - not in a Tune trial
        return ""


def _tune_report_callback(device: str, resumed_from: int, run_id: str = "") -> "TrainerCallback":
    from ray import tune
    from transformers import TrainerCallback

    class _TuneReport(TrainerCallback):
        """Report every evaluation to Tune with a checkpoint of everything a resume needs.

        An evaluation during training is followed by the Trainer's own
        checkpoint (adapter, optimizer, scheduler, RNG state, step: save_steps
        equals eval_steps), so the report waits for ``on_save`` and hands Tune
        that folder. The final evaluation after training has no checkpoint to
        follow; it reports the adapter alone, as there is nothing left to resume.
        """

        def __init__(self) -> None:
            self.last: dict[str, float] = {}
            self.pending: dict[str, Any] | None = None
            self.reported_step = -1
            self.started = time.monotonic()
            self.started_at = time.time()  # wall clock, to line trials up against each other
            import ray

            self.node_id = ray.get_runtime_context().get_node_id()
            self.trial = _trial_name()

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            for key in ("loss", "num_tokens"):
                if logs and key in logs:
                    self.last[key] = float(logs[key])

        def _metrics(self, state, metrics: dict[str, float]) -> dict[str, Any]:  # noqa: ANN001
            elapsed = time.monotonic() - self.started
            tokens = self.last.get("num_tokens")  # TRL's count of real tokens, from 0 in each worker
            return {"eval_loss": float(metrics["eval_loss"]),
                    "eval_mean_token_accuracy": float(metrics.get("eval_mean_token_accuracy", float("nan"))),
                    "train_loss": self.last.get("loss"), "step": state.global_step, "epoch": state.epoch,
                    "tokens_per_s": None if tokens is None else tokens / elapsed,
                    "peak_memory_gib": round(_peak_memory_gib(device), 3), "resumed_from_step": resumed_from,
                    "cpu_threads": _cpu_threads(device),
                    "node_id": self.node_id, "started_at": self.started_at, "reported_at": time.time()}

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kw):  # noqa: ANN001
            if state.global_step == self.reported_step or not metrics:
                return
            self.reported_step = state.global_step
            report = self._metrics(state, metrics)
            _export_trial_metrics(report, run_id, self.trial)
            if control.should_save:  # the Trainer checkpoints next; report with that folder
                self.pending = report
                return
            with tempfile.TemporaryDirectory() as d:
                model.save_pretrained(d)  # PeftModel: adapter weights + adapter_config.json only
                tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))

        def on_save(self, args, state, control, **kw):  # noqa: ANN001
            if self.pending is None:
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            tune.report(self.pending, checkpoint=tune.Checkpoint.from_directory(str(folder)))
            self.pending = None

    return _TuneReport()


def idle_cpus_callback(reserved: int, every_s: float = 5.0) -> "TrainerCallback":
    """Torch threads that follow the CPUs free on the trial's node, read at most every ``every_s`` seconds.

    On a CPU a trial runs ``reserved`` threads. Once ASHA stops its siblings and no trial is left to
    start, their CPUs sit idle to the end of the search while this trial trains on its own: a step on
    two threads takes about two thirds of the time it takes on one (SmolLM2-135M, 2 rows of 256 tokens).
    So the trial adds threads for its share of the free CPUs (``resources.cpu_threads``) and drops
    them at its next step once Ray places other work there. Ray still counts the CPUs as free: they
    are lent, never reserved.
    """
    import torch
    from transformers import TrainerCallback

    from ray_qlora.resources import cpu_threads, node_free_cpus, node_total_cpus

    class _IdleCpus(TrainerCallback):
        def __init__(self) -> None:
            import ray

            self.node_id = ray.get_runtime_context().get_node_id()
            self.total = node_total_cpus(self.node_id)  # read once: only what is free changes
            self.threads = reserved
            self.read_at = float("-inf")

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            if time.monotonic() - self.read_at < every_s:
                return
            self.read_at = time.monotonic()
            free = node_free_cpus(self.node_id)
            threads = cpu_threads(reserved, self.total, free, cores=os.cpu_count())
            if threads != self.threads:
                log.info("train: %d torch threads from step %d (%d reserved, %g of %g CPUs free on this node)",
                         threads, state.global_step, reserved, free, self.total)
                torch.set_num_threads(threads)
                self.threads = threads

    return _IdleCpus()


def _restore(out: str) -> str | None:
    """The trial's last checkpoint (after a worker died), copied to ``out``; None on a first start."""
    import shutil

    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        if not (Path(d) / "trainer_state.json").is_file() or not (Path(d) / "optimizer.pt").is_file():
            return None  # an adapter-only checkpoint (a finished trial's last report): nothing to resume
        local = Path(out) / "resume"
        shutil.copytree(d, local)
    return str(local)


def _log_to_driver() -> None:
    """Show this package's INFO lines in a trial's worker process.

    A Ray worker starts with Python's default logging, which prints warnings only, so what the trial
    chose and why (checkpointing, liger, micro-batch, threads) never reached the user. Ray forwards the
    worker's stderr to the driver's output, prefixed with the trial's name.
    """
    pkg = logging.getLogger("ray_qlora")
    if pkg.handlers:  # a second trial in a reused worker
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)
    pkg.propagate = False  # once, through this handler, whatever the root logger has


def train_trial(params: dict[str, Any], cfg_json: str, run_root: str) -> None:
    """Tune trainable: ``params`` holds the sampled values; the config and run come via tune.with_parameters."""
    import torch

    from ray_qlora.modeling import pick_device, resolve_base

    _log_to_driver()
    cfg = apply_trial_params(parse_config(json.loads(cfg_json)), params)
    run = storage.RunPaths(run_root)
    device = pick_device()
    if device == "cpu":  # one trial per CPU slice: threads beyond it only contend
        torch.set_num_threads(cfg.tune.cpus_per_trial)
    torch.manual_seed(cfg.run.seed)
    base = resolve_base(cfg.model, cfg.storage)
    train_ds, eval_ds = load_split(run.train, cfg), load_split(run.eval, cfg)
    if cfg.training.eval_max_examples:  # every trial scores the same subset, so losses compare
        eval_ds = eval_ds.select(range(min(len(eval_ds), cfg.training.eval_max_examples)))
    with tempfile.TemporaryDirectory() as out:
        resume = _restore(out)
        step = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"] if resume else 0
        if resume:
            log.info("train: resuming from the checkpoint at step %d", step)
        callbacks = [_tune_report_callback(device, step, run.run_id)]
        if device == "cpu" and cfg.tune.borrow_idle_cpus:
            callbacks.append(idle_cpus_callback(cfg.tune.cpus_per_trial))
        trainer = build_trainer(cfg, base, train_ds, eval_ds, out, device, callbacks, checkpoints=True)
        trainer.train(resume_from_checkpoint=resume)
        if trainer.state.global_step % cfg.training.eval_steps:
            trainer.evaluate()  # the final weights get reported too
