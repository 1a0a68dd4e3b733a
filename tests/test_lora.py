"""QLoRA on a tiny random model: the 4-bit base stays frozen, the adapter learns."""

from __future__ import annotations

from pathlib import Path

import torch

from ray_qlora.config import parse_config
from ray_qlora.train import build_trainer


def _dataset(n: int = 16):  # noqa: ANN202
    from datasets import Dataset

    ids = [[1, 10 + i, 20 + i, 30 + i, 2] for i in range(n)]
    labels = [[-100, -100, 20 + i, 30 + i, 2] for i in range(n)]
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def test_base_frozen_adapter_trained(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = parse_config({
        "run": {"output_uri": str(tmp_path)}, "data": {"input_uris": ["unused"]},
        "model": {"base": str(tiny_model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "eval_steps": 100,
                     "warmup_ratio": 0.0, "gradient_checkpointing": True},
    })
    trainer = build_trainer(cfg, tiny_model_dir, _dataset(), _dataset(4), str(tmp_path / "out"), "cpu")
    model = trainer.model

    import bitsandbytes as bnb

    four_bit = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit, "the base's linear layers must be 4-bit"
    some = next(iter(four_bit.values()))
    assert some.weight.quant_state.quant_type == "nf4"
    assert some.weight.quant_state.state2 is not None, "double quantization keeps a nested quant state"

    base_before = {n: m.weight.detach().clone() for n, m in four_bit.items()}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), "only LoRA matrices train"

    trainer.train()

    for n, m in four_bit.items():
        assert torch.equal(m.weight.detach(), base_before[n]), f"4-bit base weight {n} changed"
    params = dict(model.named_parameters())
    changed = [n for n, before in trainable.items() if not torch.equal(params[n].detach(), before)]
    # lora_A starts random and lora_B at zero: after a few steps both move
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)
    assert len(changed) == len(trainable)
