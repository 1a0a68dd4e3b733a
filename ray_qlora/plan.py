"""Memory planner: peak accelerator memory of one QLoRA trial, before any trial runs.

``ray-qlora plan CONFIG`` and the tune stage use it to say whether a trial
fits, the largest micro-batch that does, and whether activation
checkpointing is needed. The estimate is a sum of parts:

- frozen base: NF4 with double quantization is 0.5 byte a weight plus one
  8-bit scale per 64 weights plus one fp32 scale per 256 scales (0.516
  byte, 0.518 measured on SmolLM2-135M); embeddings, head and norms stay in
  the compute dtype;
- LoRA: r x (in + out) per targeted linear layer, kept in fp32 by peft, its
  gradient in fp32, and AdamW's two fp32 moments (or one byte each for the
  8-bit paged optimizer);
- activations per token: without checkpointing every layer keeps
  (11 h + 9.5 i) values (7.5 i with liger's fused SwiGLU), with it each layer
  keeps its input (h) and one layer is recomputed at a time; plus the loss's
  logits (2.5 bytes per vocabulary entry) and a CUDA context.

The per-token coefficients are not from first principles: they were fitted
to the six 4-bit measurements on an H200 in issue 6 (SmolLM2-1.7B shape,
r=16 on all linear layers, 4k-16k tokens per micro-batch), which they match
within 4%; the parts' forms are the ones every activation-memory analysis
uses (e.g. Korthikanti et al. 2022), so other Llama shapes scale from them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ray_qlora.config import ConfigError, PipelineConfig

__all__ = ["GIB", "ModelShape", "Plan", "llama_shape", "local_gpu_bytes", "model_shape", "plan_for_cli", "plan_trial",
           "shape_from_config"]

GIB = 2**30
NF4_DQ_BYTES = 0.5 + (1 + 4 / 256) / 64  # 4-bit codes + 8-bit block scale per 64 + fp32 scale per 256 scales
CUDA_CONTEXT_BYTES = 0.35 * GIB  # CUDA context, cuBLAS workspace, allocator slack
HEADROOM = 0.05  # share of the card left free: fragmentation, NCCL, the odd temporary
# Fitted per-token activation coefficients (see module docstring), in units of compute-dtype values.
ACT_H, ACT_I, ACT_I_LIGER = 11.0, 9.5, 7.5
CKPT_EXTRA_H = 7.0  # values per token held while a layer is recomputed (fitted with the others)
LOGIT_BYTES = 2.5  # bytes per token and vocabulary entry at the loss
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a Llama-architecture decoder."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection in one layer."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def quantized_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def unquantized_params(self) -> int:
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.hidden * (2 * self.layers + 1)  # + RMSNorm weights

    @property
    def params(self) -> int:
        return self.quantized_params + self.unquantized_params


# Published Llama-family shapes, by parameter count; ``llama_shape`` scales the nearest.
_REFERENCE_SHAPES = (
    ModelShape(576, 1536, 30, 9, 3, 49152, True),        # SmolLM2-135M
    ModelShape(960, 2560, 32, 15, 5, 49152, True),       # SmolLM2-360M
    ModelShape(2048, 8192, 24, 32, 32, 49152, True),     # SmolLM2-1.7B
    ModelShape(4096, 11008, 32, 32, 32, 32000, False),   # Llama 2 7B
    ModelShape(5120, 13824, 40, 40, 40, 32000, False),   # Llama 2 13B
    ModelShape(6656, 17920, 60, 52, 52, 32000, False),   # LLaMA 33B
    ModelShape(8192, 22016, 80, 64, 64, 32000, False),   # LLaMA 65B
    ModelShape(8192, 28672, 80, 64, 8, 32000, False),    # Llama 2 70B
)


def llama_shape(params: float) -> ModelShape:
    """A Llama shape of about ``params`` parameters: the nearest published one, its depth scaled."""
    if params <= 0:
        raise ValueError("--params must be positive")
    ref = min(_REFERENCE_SHAPES, key=lambda s: abs(math.log(s.params / params)))
    per_layer = ref.quantized_params / ref.layers + 2 * ref.hidden
    layers = max(1, round((params - ref.unquantized_params + 2 * ref.hidden * ref.layers) / per_layer))
    return ModelShape(ref.hidden, ref.intermediate, layers, ref.heads, ref.kv_heads, ref.vocab, ref.tied)


def shape_from_config(model_dir: Path | str) -> ModelShape:
    """The shape in a model folder's config.json (any Llama-like decoder)."""
    path = Path(model_dir) / "config.json"
    try:
        c = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the model's shape from {path}: {err}") from None
    c = c.get("text_config", c)
    try:
        heads = int(c["num_attention_heads"])
        return ModelShape(int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_hidden_layers"]), heads,
                          int(c.get("num_key_value_heads") or heads), int(c["vocab_size"]),
                          bool(c.get("tie_word_embeddings", False)))
    except KeyError as err:
        raise ValueError(f"{path} lacks {err}; plan with --params for a Llama shape instead") from None


@dataclass
class Plan:
    """The estimate for one trial: bytes per part, total, and what fits."""

    parts: dict[str, float]
    total: float
    budget: float | None
    fits: bool | None
    micro_batch: int
    seq_length: int
    checkpointing: bool
    liger: bool
    max_micro_batch_with_checkpointing: int | None  # None without a budget
    max_micro_batch_without_checkpointing: int | None

    @property
    def max_micro_batch(self) -> int | None:
        """The largest micro-batch that fits with this plan's checkpointing setting."""
        return (self.max_micro_batch_with_checkpointing if self.checkpointing
                else self.max_micro_batch_without_checkpointing)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_micro_batch": self.max_micro_batch, "parts_gib": {k: round(v / GIB, 3) for k, v in self.parts.items()},
                "total_gib": round(self.total / GIB, 2),
                "budget_gib": None if self.budget is None else round(self.budget / GIB, 2)}

    def table(self) -> str:
        rows = [f"  {name:<28} {b / GIB:8.2f} GiB" for name, b in self.parts.items()]
        rows.append(f"  {'total (peak, estimated)':<28} {self.total / GIB:8.2f} GiB")
        head = (f"trial: micro-batch {self.micro_batch} x {self.seq_length} tokens, checkpointing "
                f"{'on' if self.checkpointing else 'off'}, liger {'on' if self.liger else 'off'}")
        tail = []
        if self.budget is not None:
            tail.append(f"  budget (usable)              {self.budget / GIB:8.2f} GiB -> "
                        f"{'fits' if self.fits else 'DOES NOT FIT'}")
            tail.append(f"  largest micro-batch that fits: {self.max_micro_batch_with_checkpointing} with "
                        f"checkpointing, {self.max_micro_batch_without_checkpointing} without")
        return "\n".join([head, *rows, *tail])


def _lora_params(shape: ModelShape, r: int, targets: str | list[str]) -> int:
    if targets == "all-linear":
        chosen: Sequence[str] = LINEAR_NAMES
    else:  # "q_proj" or a longer suffix of a module's name, "self_attn.q_proj" (peft matches both)
        chosen = [n for n in LINEAR_NAMES if any(t == n or t.endswith("." + n) for t in targets)]
    return shape.layers * sum(r * (a + b) for name, (a, b) in shape.linear_shapes().items() if name in chosen)


def _per_token(shape: ModelShape, dtype_bytes: int, checkpointing: bool, liger: bool) -> float:
    """Activation bytes per token of a micro-batch, logits included."""
    h, i = shape.hidden, shape.intermediate
    layer = dtype_bytes * (ACT_H * h + (ACT_I_LIGER if liger else ACT_I) * i)
    logits = LOGIT_BYTES * shape.vocab
    if checkpointing:
        return shape.layers * dtype_bytes * h + layer + dtype_bytes * CKPT_EXTRA_H * h + logits
    return shape.layers * layer + logits


def estimate(shape: ModelShape, *, seq_length: int, micro_batch: int, checkpointing: bool, liger: bool,
             lora_r: int, lora_targets: str | list[str], optimizer: str, dtype: str, load_in_4bit: bool = True,
             on_gpu: bool = True) -> dict[str, float]:
    """Bytes per part of one trial's peak memory."""
    dtype_bytes = DTYPE_BYTES[dtype]
    lora = _lora_params(shape, lora_r, lora_targets)
    optim_bytes = 2 if "8bit" in optimizer else 8
    base_bytes = NF4_DQ_BYTES if load_in_4bit else dtype_bytes
    tokens = seq_length * micro_batch
    act = _per_token(shape, dtype_bytes, checkpointing, liger)
    logits = LOGIT_BYTES * shape.vocab * tokens
    return {
        "base weights (4-bit)" if load_in_4bit else f"base weights ({dtype})": shape.quantized_params * base_bytes,
        "embeddings, head, norms": shape.unquantized_params * dtype_bytes,
        "LoRA weights + gradients": lora * 8.0,
        "optimizer state": lora * float(optim_bytes),
        "activations": act * tokens - logits,
        "logits (loss)": logits,
        "CUDA context": CUDA_CONTEXT_BYTES if on_gpu else 0.0,
    }


def _largest_batch(fixed: float, per_row: float, budget: float) -> int:
    return max(0, int((budget - fixed) // per_row)) if per_row > 0 else 0


def plan_trial(cfg: PipelineConfig, shape: ModelShape, gpu_bytes: float | None, *, checkpointing: bool | None = None,
               liger: bool | None = None, micro_batch: int | None = None, on_gpu: bool = True) -> Plan:
    """The plan for a trial of ``cfg`` on a device with ``gpu_bytes`` (None: report only).

    ``checkpointing``, ``liger`` and ``micro_batch`` default to what the
    config says; "auto" values resolve the way a trial resolves them (see
    ``train.resolve_speed``): the caller passes the resolved ones.
    """
    t = cfg.training
    ck = bool(t.gradient_checkpointing) if checkpointing is None else checkpointing
    lg = bool(t.use_liger is True) if liger is None else liger
    mb = micro_batch if micro_batch is not None else (t.batch_size if isinstance(t.batch_size, int) else 1)
    dtype = cfg.model.quantization.compute_dtype
    dtype = ("bfloat16" if on_gpu else "float32") if dtype == "auto" else dtype
    common = dict(seq_length=cfg.data.max_seq_length, liger=lg, lora_r=cfg.lora.r, lora_targets=cfg.lora.target_modules,
                  optimizer=t.optimizer, dtype=dtype, load_in_4bit=cfg.model.quantization.load_in_4bit, on_gpu=on_gpu)
    parts = estimate(shape, micro_batch=mb, checkpointing=ck, **common)
    total = sum(parts.values())
    budget = None if gpu_bytes is None else gpu_bytes * (1 - HEADROOM)

    def largest(with_ckpt: bool) -> int:
        one = sum(estimate(shape, micro_batch=1, checkpointing=with_ckpt, **common).values())
        two = sum(estimate(shape, micro_batch=2, checkpointing=with_ckpt, **common).values())
        return _largest_batch(one - (two - one), two - one, budget)  # type: ignore[arg-type]

    return Plan(parts=parts, total=total, budget=budget, fits=None if budget is None else total <= budget,
                micro_batch=mb, seq_length=cfg.data.max_seq_length, checkpointing=ck, liger=lg,
                max_micro_batch_with_checkpointing=None if budget is None else largest(True),
                max_micro_batch_without_checkpointing=None if budget is None else largest(False))


# Cards a plan is shown for when no GPU is named or present (GiB, as cards are labelled).
COMMON_CARDS = {"L4 / A10G 24 GB": 24, "L40S / A6000 48 GB": 48, "A100 / H100 80 GB": 80, "H200 141 GB": 141}


@dataclass
class CliReport:
    text: str
    fits: bool | None  # None when no single card was asked about


def _resolved_plan(cfg: PipelineConfig, shape: ModelShape, budget: float) -> tuple[Plan, list[str]]:
    from ray_qlora.train import resolve_speed

    resolved, why = resolve_speed(cfg, shape, "cuda", gpu_bytes=budget)
    return plan_trial(resolved, shape, budget), why


def model_shape(cfg: PipelineConfig, params: float | None) -> ModelShape:
    """The shape to plan for: a Llama of ``params`` parameters, or the configured base's own."""
    from ray_qlora.modeling import resolve_base

    if params is not None:
        if params <= 0:
            raise ConfigError(f"plan: --params must be a positive number of parameters (got {params:g})")
        return llama_shape(params)
    try:
        return shape_from_config(resolve_base(cfg.model, cfg.storage))
    except (ValueError, OSError) as err:
        raise ConfigError(f"plan: model.base={cfg.model.base!r}: {err}") from None


def plan_for_cli(cfg: PipelineConfig, params: float | None, gpu_bytes: float | None) -> CliReport:
    """What `ray-qlora plan` prints: the breakdown for one GPU, or a verdict per common card."""
    shape = model_shape(cfg, params)
    if params is None:  # the configured base itself: its module names can be checked too
        from ray_qlora.modeling import check_lora_targets, resolve_base

        check_lora_targets(cfg, resolve_base(cfg.model, cfg.storage))
    head = (f"model: {shape.params / 1e9:.2f}B parameters (hidden {shape.hidden}, {shape.layers} layers, "
            f"vocab {shape.vocab}); LoRA r={cfg.lora.r} on {cfg.lora.target_modules}")
    if gpu_bytes is not None and gpu_bytes <= 0:
        raise ConfigError("plan: --gpu-memory-gb must be positive (24 for a 24 GB card)")
    if gpu_bytes is None:
        gpu_bytes = local_gpu_bytes()
    if gpu_bytes is not None:
        plan, why = _resolved_plan(cfg, shape, gpu_bytes)
        lines = [head, plan.table(), *(f"  auto: {w}" for w in why)]
        if not plan.fits:
            lines.append("  does not fit: lower data.max_seq_length or training.batch_size, set "
                         "training.gradient_checkpointing: true, or use a GPU with more memory")
        return CliReport("\n".join(lines), bool(plan.fits))
    lines = [head, "no GPU here and none named (--gpu-memory-gb): verdicts for common cards"]
    for name, gib in COMMON_CARDS.items():
        plan, _ = _resolved_plan(cfg, shape, gib * GIB)
        verdict = "fits" if plan.fits else "does not fit"
        lines.append(f"  {name:<22} {verdict:<13} peak {plan.total / GIB:6.1f} GiB, micro-batch {plan.micro_batch}, "
                     f"checkpointing {'on' if plan.checkpointing else 'off'}, largest micro-batch "
                     f"{plan.max_micro_batch}")
    return CliReport("\n".join(lines), None)


def local_gpu_bytes() -> float | None:
    """Total memory of this process's first GPU; None without one."""
    try:
        import torch
    except ImportError:
        return None
    return float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None
