"""GPU path: the same code on CUDA, bf16 compute. Skipped where there is no GPU."""

from __future__ import annotations

import importlib.util
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


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-3)])
def test_packed_loss_equals_unpacked_on_gpu(dtype: torch.dtype, tol: float) -> None:
    """Packed rows (position ids restarting per example, no attention mask: what TRL's padding-free
    collator passes) give the unpacked loss on CUDA with SDPA; plain positions do not."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ray_qlora.data.packing import pack_examples

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to("cuda", dtype).eval()
    with torch.no_grad():  # larger weights: attention across examples would move the loss a lot
        for p in model.parameters():
            p.mul_(5)
    lengths = [9, 23, 14, 31, 12, 17]
    ids = [torch.randint(3, 512, (n,)).tolist() for n in lengths]
    labels = [[-100] * (n // 2) + x[n // 2:] for n, x in zip(lengths, ids)]

    def loss_sum(logits: torch.Tensor, lab: torch.Tensor) -> tuple[float, int]:
        lab = lab[:, 1:].to("cuda")
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), lab.flatten(),
                                                 ignore_index=-100, reduction="sum")
        return float(loss), int((lab != -100).sum())

    width = max(lengths)
    pad = lambda rows, v: torch.tensor([r + [v] * (width - len(r)) for r in rows])  # noqa: E731
    with torch.no_grad():
        out = model(input_ids=pad(ids, 0).cuda(), attention_mask=pad([[1] * n for n in lengths], 0).cuda(),
                    use_cache=False)
        ref, ref_n = loss_sum(out.logits, pad(labels, -100))

        packed = pack_examples(ids, labels, capacity=64)
        flat_ids = torch.tensor([sum(packed["input_ids"], [])]).cuda()
        flat_labels = torch.tensor([sum(packed["labels"], [])])
        restart = torch.tensor([[i for n in sum(packed["seq_lengths"], []) for i in range(n)]]).cuda()
        got, got_n = loss_sum(model(input_ids=flat_ids, position_ids=restart, use_cache=False).logits, flat_labels)
        plain = torch.arange(flat_ids.shape[1], device="cuda")[None]
        leak, _ = loss_sum(model(input_ids=flat_ids, position_ids=plain, use_cache=False).logits, flat_labels)
    # pack_examples masks each example's first label, which unpacked is never predicted anyway
    # relative differences; on CPU: 0 (fp32) and 3e-6 (bf16) packed, 2e-2 with plain positions
    assert got_n == ref_n
    assert abs(got / ref - 1) < tol
    assert abs(leak / ref - 1) > 5e-3


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM with CUDA (the ray[llm] extra)")
def test_vllm_engine_serves_on_one_gpu(tokenizer_dir: Path, tmp_path: Path) -> None:
    """serve.engine: vllm on GPU is the CPU path's code with a GPU per replica (no accelerator override)."""
    import shutil

    import ray
    from openai import OpenAI
    from ray import serve
    from transformers import LlamaConfig, LlamaForCausalLM

    from ray_qlora import storage
    from ray_qlora.config import parse_config
    from ray_qlora.local_s3 import free_port
    from ray_qlora.serve.deployment import deploy

    merged = tmp_path / "out" / "runs" / "g1" / "merged"
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)).save_pretrained(merged)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, merged / f.name)
    port = free_port()
    cfg = parse_config({"run": {"output_uri": str(tmp_path / "out")}, "data": {"input_uris": ["x"]},
                        "model": {"base": str(merged)},
                        "serve": {"engine": "vllm", "auth": "none", "port": port, "gpus_per_replica": 1,
                                  "max_adapters": 0, "model_name": "gpu-tiny",
                                  "engine_kwargs": {"gpu_memory_utilization": 0.2}}})
    ray.init(num_gpus=1, include_dashboard=False)
    try:
        info = deploy(cfg, storage.RunPaths.for_run(cfg.run.output_uri, "g1"), "g1")
        assert info["engine"] == "vllm" and info["deployment"]["ray_actor_options"]["num_gpus"] == 1.0
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        out = client.chat.completions.create(model="gpu-tiny", max_tokens=8, temperature=1.0, seed=3,
                                             messages=[{"role": "user", "content": "hi"}])
        assert out.usage.completion_tokens == 8
    finally:
        serve.shutdown()
        ray.shutdown()
