"""GPU path: the same code on CUDA, bf16 compute. Skipped where there is no GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_qlora_step_on_gpu_in_bf16(tiny_model_dir: Path) -> None:
    import bitsandbytes as bnb

    from ray_qlora.config import LoraConfig, QuantizationConfig
    from ray_qlora.modeling import attach_lora, compute_dtype_name, load_4bit_base

    quant = QuantizationConfig()
    assert compute_dtype_name(quant, "cuda") == "bfloat16"
    model = attach_lora(load_4bit_base(tiny_model_dir, quant, "cuda"), LoraConfig(r=4), gradient_checkpointing=True)
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert layer.weight.device.type == "cuda" and layer.compute_dtype == torch.bfloat16
    ids = torch.randint(3, 1000, (2, 16), device="cuda")
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
