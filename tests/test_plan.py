"""The memory planner agrees with published reference points and with measured footprints."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_qlora.config import parse_config
from ray_qlora.plan import GIB, llama_shape, plan_trial, shape_from_config
from ray_qlora.train import resolve_speed

SMOLLM2_1_7B = "SmolLM2-1.7B"


def _cfg(seq: int = 512, batch: int | str = 1, r: int = 16, **training: object):  # noqa: ANN202
    return parse_config({"run": {"output_uri": "/tmp/x"}, "data": {"input_uris": ["/tmp/x"], "max_seq_length": seq},
                         "lora": {"r": r}, "training": {"batch_size": batch, **training}})


@pytest.mark.parametrize("params", [135e6, 1.7e9, 7e9, 13e9, 65e9, 70e9, 3e9])
def test_llama_shape_has_the_size_asked_for(params: float) -> None:
    assert llama_shape(params).params == pytest.approx(params, rel=0.06)


def test_qlora_paper_reference_points() -> None:
    # QLoRA (Dettmers et al. 2023): a 7B model fine-tunes on a 24 GB card, 65B on one 48 GB GPU but not on 24 GB
    cfg = _cfg(seq=512, batch=1, gradient_checkpointing=True, optimizer="paged_adamw_8bit")
    assert plan_trial(cfg, llama_shape(7e9), 24 * GIB).fits
    assert plan_trial(cfg, llama_shape(65e9), 48 * GIB).fits
    assert not plan_trial(cfg, llama_shape(65e9), 24 * GIB).fits
    # and a 65B's frozen 4-bit weights alone are ~0.52 bytes a weight
    parts = plan_trial(cfg, llama_shape(65e9), None).parts
    assert parts["base weights (4-bit)"] / llama_shape(65e9).quantized_params == pytest.approx(0.516, abs=0.01)


# Issue 6's measurements on one H200: SmolLM2-1.7B shape, r=16 on all linear layers, bf16 compute,
# 2,048-token examples: (rows x tokens per micro-batch, checkpointing, liger, measured peak GiB).
H200 = [(8, True, False, 8.7), (8, True, True, 8.2), (8, False, False, 74.6), (2, True, False, 3.2),
        (4, False, False, 40.3), (4, False, True, 34.3)]


@pytest.mark.parametrize(("rows", "ckpt", "liger", "measured"), H200)
def test_agrees_with_measured_h200_peaks(rows: int, ckpt: bool, liger: bool, measured: float) -> None:
    shape = llama_shape(1.7e9)
    assert (shape.hidden, shape.intermediate, shape.layers) == (2048, 8192, 24)  # SmolLM2-1.7B's shape
    est = plan_trial(_cfg(seq=2048, batch=rows), shape, None, checkpointing=ckpt, liger=liger).total / GIB
    assert est == pytest.approx(measured, rel=0.25)


def _measured_weight_bytes(model_dir: Path) -> float:
    """Bytes the loaded 4-bit model holds: packed codes, both levels of scales, and the rest."""
    import bitsandbytes as bnb

    from ray_qlora.config import QuantizationConfig
    from ray_qlora.modeling import load_4bit_base

    model = load_4bit_base(model_dir, QuantizationConfig(), "cpu")
    quantized, total = set(), 0.0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w, qs = module.weight, module.weight.quant_state
            total += w.data.nbytes + qs.absmax.nbytes + qs.code.nbytes
            if qs.nested:
                total += qs.state2.absmax.nbytes + qs.state2.code.nbytes
            quantized.add(id(w))
    return total + sum(p.nbytes for p in model.parameters() if id(p) not in quantized)


@pytest.mark.parametrize("which", ["tiny", "smollm2-135m"])
def test_weights_within_10_percent_of_the_loaded_model(which: str, tiny_model_dir: Path) -> None:
    from ray_qlora.config import ModelConfig, StorageConfig
    from ray_qlora.modeling import resolve_base

    model_dir = tiny_model_dir if which == "tiny" else resolve_base(ModelConfig(), StorageConfig())
    parts = plan_trial(_cfg(), shape_from_config(model_dir), None, on_gpu=False).parts
    planned = parts["base weights (4-bit)"] + parts["embeddings, head, norms"]  # fp32 on a CPU
    assert planned == pytest.approx(_measured_weight_bytes(model_dir), rel=0.10)


def test_largest_micro_batch_is_the_edge_of_fitting() -> None:
    shape, budget = llama_shape(7e9), 24 * GIB
    plan = plan_trial(_cfg(seq=2048, gradient_checkpointing=True), shape, budget)
    edge = plan.max_micro_batch
    assert edge and edge >= 1
    assert plan_trial(_cfg(seq=2048, batch=edge, gradient_checkpointing=True), shape, budget).fits
    assert not plan_trial(_cfg(seq=2048, batch=edge + 1, gradient_checkpointing=True), shape, budget).fits
    assert plan.max_micro_batch_without_checkpointing < edge == plan.max_micro_batch_with_checkpointing


def test_cpu_trial_skips_checkpointing_and_liger() -> None:
    cfg, why = resolve_speed(_cfg(batch="auto"), llama_shape(135e6), "cpu")
    t = cfg.training
    assert (t.gradient_checkpointing, t.use_liger, t.batch_size) == (False, False, 8)
    assert any("checkpointing off" in w for w in why) and any("liger kernels off" in w for w in why)


def test_gpu_trial_turns_checkpointing_off_only_when_activations_fit() -> None:
    shape = llama_shape(1.7e9)
    roomy, why = resolve_speed(_cfg(seq=2048, batch=4), shape, "cuda", gpu_bytes=139 * GIB)
    assert roomy.training.gradient_checkpointing is False
    assert any("checkpointing off" in w for w in why)
    tight, _ = resolve_speed(_cfg(seq=2048, batch=4), shape, "cuda", gpu_bytes=24 * GIB)
    assert tight.training.gradient_checkpointing is True
    # 'auto' micro-batch: as large as fits, within the cap
    auto, why = resolve_speed(_cfg(seq=2048, batch="auto"), shape, "cuda", gpu_bytes=139 * GIB)
    assert auto.training.gradient_checkpointing is False and 4 <= auto.training.batch_size <= 16
    assert plan_trial(auto, shape, 139 * GIB).fits


def test_explicit_settings_are_kept() -> None:
    cfg, why = resolve_speed(_cfg(seq=2048, batch=2, gradient_checkpointing=True, use_liger=False),
                             llama_shape(1.7e9), "cuda", gpu_bytes=139 * GIB)
    assert (cfg.training.gradient_checkpointing, cfg.training.use_liger, cfg.training.batch_size) == (True, False, 2)
    assert why == []


@pytest.mark.parametrize(("args", "message"), [
    (["--params", "-5"], "--params must be a positive number"),
    (["--params", "7e9", "--gpu-memory-gb", "0"], "--gpu-memory-gb must be positive"),
])
def test_plan_cli_bad_numbers_get_one_line_and_exit_2(args: list[str], message: str, capsys) -> None:  # noqa: ANN001
    from ray_qlora.cli import main

    assert main(["plan", "jobs/configs/demo.yaml", *args]) == 2
    assert message in capsys.readouterr().err


def test_plan_cli_says_whether_it_fits(capsys) -> None:  # noqa: ANN001
    from ray_qlora.cli import main

    assert main(["plan", "jobs/configs/demo.yaml", "--params", "65e9", "--gpu-memory-gb", "24"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["plan", "jobs/configs/demo.yaml", "--params", "7e9", "--gpu-memory-gb", "24"]) == 0
    assert "-> fits" in capsys.readouterr().out


def _write(tmp_path: Path, model: Path, lora: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(f"run: {{output_uri: {tmp_path}/out}}\ndata: {{input_uris: [{tmp_path}/raw]}}\n"
                    f"model: {{base: {model}}}\nlora: {lora}\n")
    return str(path)


def test_plan_refuses_lora_targets_the_base_lacks(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from ray_qlora.cli import main

    assert main(["plan", _write(tmp_path, tiny_model_dir, "{target_modules: [q_proj, v_prj]}")]) == 2
    err = capsys.readouterr().err
    assert ("lora.target_modules: v_prj is not a module of" in err
            and "its linear layers are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in err)
    # a longer suffix of a module's name is what peft matches too
    assert main(["plan", _write(tmp_path, tiny_model_dir, "{target_modules: [self_attn.q_proj, v_proj]}")]) == 0


def test_a_dotted_target_is_planned_like_its_short_name() -> None:
    shape = llama_shape(7e9)

    def lora_bytes(targets: list[str]) -> float:
        cfg = _cfg().with_overrides({"lora.target_modules": targets})
        return plan_trial(cfg, shape, 24 * GIB).parts["LoRA weights + gradients"]

    assert lora_bytes(["self_attn.q_proj", "mlp.down_proj"]) == lora_bytes(["q_proj", "down_proj"])
    assert lora_bytes(["q_proj", "down_proj"]) > lora_bytes(["q_proj"]) > 0


def test_a_base_transformers_cannot_build_is_one_line(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from ray_qlora.cli import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"")
    (model / "config.json").write_text('{"model_type": "no_such_arch", "hidden_size": 8, "intermediate_size": 8, '
                                       '"num_hidden_layers": 1, "num_attention_heads": 1, "vocab_size": 10}')
    assert main(["plan", _write(tmp_path, model, "{target_modules: [q_proj]}")]) == 2
    assert "is not a causal language model transformers can build" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["q_proj", "self_attn.q_proj", "layers.1.mlp.down_proj", "lm_head",
                                    "input_layernorm", "v_prj", "proj", "_proj", "layers.2.mlp.up_proj"])
def test_target_matching_agrees_with_peft(target: str, tiny_model_dir: Path) -> None:
    """Our copy of peft's rule (kept out of peft to spare `plan` importing bitsandbytes) matches peft's."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from ray_qlora.modeling import base_modules, unmatched_targets

    names = list(base_modules(tiny_model_dir))
    peft_finds = any(check_target_module_exists(PeftLoraConfig(target_modules=[target]), n) for n in names)
    assert (unmatched_targets([target], names) == []) == peft_finds
