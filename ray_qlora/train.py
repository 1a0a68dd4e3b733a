"""What one Tune trial runs: a QLoRA fine-tune with TRL's SFTTrainer.

The 4-bit base is frozen; only LoRA matrices train. Every ``eval_steps`` the
trial reports eval loss to Tune together with a checkpoint holding the
adapter alone (a few MB, never the base), so ASHA can stop weak trials and
the best checkpoint of the best trial is what ``merge`` picks up.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray_qlora import storage
from ray_qlora.config import TUNABLE_KEYS, PipelineConfig, parse_config

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback

__all__ = ["PACKED_COLUMN", "apply_trial_params", "build_trainer", "is_packed", "load_split", "train_trial"]

log = logging.getLogger(__name__)

# The column a packed split has and an unpacked one lacks; named as TRL's collator reads it.
PACKED_COLUMN = "seq_lengths"


def apply_trial_params(cfg: PipelineConfig, params: dict[str, Any]) -> PipelineConfig:
    """The pipeline config with a trial's sampled values (e.g. lora_r) put in place."""
    overrides = {".".join(TUNABLE_KEYS[k]): v for k, v in params.items() if k in TUNABLE_KEYS}
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


def _sft_args(cfg: PipelineConfig, output_dir: str, device: str, packed: bool = False) -> Any:
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
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        logging_steps=t.logging_steps,
        save_strategy="no",  # Tune keeps the checkpoints (adapter only), see _TuneReport
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


def build_trainer(cfg: PipelineConfig, base_path: Path, train_ds: "Dataset", eval_ds: "Dataset",
                  output_dir: str, device: str, callbacks: list["TrainerCallback"] | None = None) -> "Trainer":
    """SFTTrainer over a 4-bit base with LoRA attached; the one place a trial's model is built."""
    from trl import SFTTrainer

    from ray_qlora.modeling import attach_lora, load_4bit_base, load_tokenizer

    packed = _training_mode(train_ds, eval_ds, cfg.data.max_seq_length)
    tok = load_tokenizer(base_path, cfg.data.chat_template)
    model = load_4bit_base(base_path, cfg.model.quantization, device)
    model = attach_lora(model, cfg.lora, cfg.training.gradient_checkpointing)
    return SFTTrainer(model=model, args=_sft_args(cfg, output_dir, device, packed), train_dataset=train_ds,
                      eval_dataset=eval_ds, processing_class=tok, callbacks=callbacks or [])


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


def _tune_report_callback() -> "TrainerCallback":
    from ray import tune
    from transformers import TrainerCallback

    class _TuneReport(TrainerCallback):
        """After each evaluation: save the adapter and report eval loss with it to Tune."""

        def __init__(self) -> None:
            self.last_train_loss: float | None = None
            self.reported_step = -1

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if logs and "loss" in logs:
                self.last_train_loss = float(logs["loss"])

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kw):  # noqa: ANN001
            if state.global_step == self.reported_step or not metrics:
                return
            self.reported_step = state.global_step
            with tempfile.TemporaryDirectory() as d:
                model.save_pretrained(d)  # PeftModel: adapter weights + adapter_config.json only
                (Path(d) / "trainer_state.json").write_text(json.dumps(
                    {"global_step": state.global_step, "epoch": state.epoch}))
                tune.report({"eval_loss": float(metrics["eval_loss"]), "train_loss": self.last_train_loss,
                             "step": state.global_step, "epoch": state.epoch},
                            checkpoint=tune.Checkpoint.from_directory(d))

    return _TuneReport()


def train_trial(params: dict[str, Any]) -> None:
    """Tune trainable: params holds the serialized pipeline config, run root and sampled values."""
    import torch

    from ray_qlora.modeling import pick_device, resolve_base

    cfg = apply_trial_params(parse_config(json.loads(params["cfg_json"])), params)
    run = storage.RunPaths(params["run_root"])
    device = pick_device()
    if device == "cpu":  # one trial per CPU slice: threads beyond it only contend
        torch.set_num_threads(cfg.tune.cpus_per_trial)
    torch.manual_seed(cfg.run.seed)
    base = resolve_base(cfg.model, cfg.storage)
    train_ds, eval_ds = load_split(run.train, cfg), load_split(run.eval, cfg)
    if cfg.training.eval_max_examples:  # every trial scores the same subset, so losses compare
        eval_ds = eval_ds.select(range(min(len(eval_ds), cfg.training.eval_max_examples)))
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(cfg, base, train_ds, eval_ds, out, device, [_tune_report_callback()])
        trainer.train()
        if trainer.state.global_step % cfg.training.eval_steps:
            trainer.evaluate()  # the final weights get reported too
