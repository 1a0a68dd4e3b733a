"""QLoRA on a tiny random model: the 4-bit base stays frozen, the adapter learns."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ray_qlora.config import parse_config
from ray_qlora.train import build_trainer


def _dataset(n: int = 16):  # noqa: ANN202
    from datasets import Dataset

    ids = [[1, 10 + i, 20 + i, 30 + i, 2] for i in range(n)]
    labels = [[-100, -100, 20 + i, 30 + i, 2] for i in range(n)]
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def _frozen_state(layer) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """(4-bit codes in the standard layout, dequantized weights) of a Linear4bit.

    Not the packed bytes: on CPUs with AVX512-BF16, bitsandbytes repacks a
    layer into a CPU layout the first time it runs in eval mode without grad
    (same weights, other bytes, block scales kept in bf16). Its own inverse
    gives the standard layout back, so the codes compare exactly and the
    weights to bf16 rounding of the scales.
    """
    import bitsandbytes.functional as bnbf

    data, state = layer.weight.data, layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, state)
    return data.detach().clone().reshape(-1), bnbf.dequantize_4bit(data, state).detach().float().clone()


def _assert_same_weights(before: tuple[torch.Tensor, torch.Tensor], after: tuple[torch.Tensor, torch.Tensor],
                         name: str) -> None:
    assert torch.equal(before[0], after[0]), f"4-bit codes of {name} changed"
    # bf16 scales: relative error below 2**-8; a trained weight moves by far more
    torch.testing.assert_close(after[1], before[1], rtol=2**-7, atol=1e-6, msg=f"base weight {name} changed")


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

    base_before = {n: _frozen_state(m) for n, m in four_bit.items()}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), "only LoRA matrices train"
    # compute is fp32 on a CPU; TRL's bf16 cast of QLoRA adapters would run every LoRA matmul in emulated bf16
    assert {p.dtype for p in trainable.values()} == {torch.float32}

    trainer.evaluate()  # eval mode without grad: must not switch the base to an inference-only layout
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in four_bit.values())
    trainer.train()

    for n, m in four_bit.items():
        _assert_same_weights(base_before[n], _frozen_state(m), n)
    params = dict(model.named_parameters())
    changed = [n for n, before in trainable.items() if not torch.equal(params[n].detach(), before)]
    # lora_A starts random and lora_B at zero: after a few steps both move
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)
    assert len(changed) == len(trainable)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_resume_goes_on_as_the_uninterrupted_run(device: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """A trial resumed from its step-2 checkpoint trains steps 3-4 as the run that never stopped.

    bf16 compute (the GPU recipe's dtype; on a CPU too): TRL casts QLoRA
    adapters to bf16, while peft loads a checkpoint's adapter back as fp32, so
    a resumed trial would train in another dtype unless adapters stay fp32
    (the losses then differ by about 1e-5 relative from step 3).
    """
    from transformers import TrainerCallback

    class Losses(TrainerCallback):
        def __init__(self) -> None:
            self.by_step: dict[int, float] = {}

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if logs and "loss" in logs:
                self.by_step[state.global_step] = logs["loss"]

    cfg = parse_config({
        "run": {"output_uri": str(tmp_path)}, "data": {"input_uris": ["unused"]},
        "model": {"base": str(tiny_model_dir), "quantization": {"compute_dtype": "bfloat16"}},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},  # dropout: the RNG state must come back too
        "training": {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "eval_steps": 2, "logging_steps": 1,
                     "warmup_ratio": 0.0},
    })
    checkpoint = tmp_path / "step2"

    class KeepStep2(TrainerCallback):
        def on_save(self, args, state, control, **kw):  # noqa: ANN001
            if state.global_step == 2:  # save_total_limit=1 deletes it once step 4 is saved
                shutil.copytree(Path(args.output_dir) / "checkpoint-2", checkpoint)

    whole, resumed = Losses(), Losses()
    first = build_trainer(cfg, tiny_model_dir, _dataset(), _dataset(4), str(tmp_path / "a"), device,
                          [whole, KeepStep2()], checkpoints=True)
    first.train()
    second = build_trainer(cfg, tiny_model_dir, _dataset(), _dataset(4), str(tmp_path / "b"), device, [resumed],
                           checkpoints=True)
    second.train(resume_from_checkpoint=str(checkpoint))

    assert sorted(whole.by_step) == [1, 2, 3, 4] and sorted(resumed.by_step) == [3, 4]
    # exact on a CPU; the margin leaves room for GPU kernels that need not repeat bit for bit
    assert [resumed.by_step[s] for s in (3, 4)] == pytest.approx([whole.by_step[s] for s in (3, 4)], rel=1e-6)
    for model in (first.model, second.model):
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
