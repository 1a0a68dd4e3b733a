"""Export a merged Llama-architecture model folder to one GGUF file, and check it.

``write_gguf`` turns what ``save_pretrained`` writes (config.json, safetensors,
tokenizer.json, chat template) into a GGUF file that llama.cpp and Ollama
load: f16, or q8_0 for a file about half the size. ``verify_gguf`` loads the
file back with transformers' own GGUF reader and compares tokenizer ids,
chat template and logits with the original folder, so a bad export (a wrong
q/k layout, a lost token, a dropped template) shows up as numbers before a
user ever runs it.

Everything GGUF-specific comes from the ``gguf`` package (llama.cpp's
gguf-py): the writer, tensor names, key names, token types and the q8_0
quantizer. What this module adds is the Llama-specific glue: which config
fields go to which keys, the q/k row permutation llama.cpp's rope expects,
and reading a GPT-2-style byte-level BPE tokenizer out of tokenizer.json.

Only Llama-architecture models with a byte-level BPE tokenizer are exported;
anything else is refused with a ``GGUFExportError`` that names the problem,
rather than written into a file that loads but answers wrongly.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay inside the functions
    import numpy as np

__all__ = ["GGUF_TYPES", "GGUFExportError", "verify_gguf", "write_gguf"]

GGUF_TYPES = ("f16", "q8_0")

# The pre-tokenizers of tokenizer.json this module can name for llama.cpp
# (`tokenizer.ggml.pre`), which picks its splitting regexes by that name.
# Plain GPT-2 byte-level splitting:
_PRE_GPT2 = "gpt-2"
# Digits split one by one, then GPT-2 splitting (SmolLM's hub tokenizer):
_PRE_SMOLLM = "smollm"
# Llama 3's split regex followed by a byte-level step without its own regex:
_PRE_LLAMA3 = "llama-bpe"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class GGUFExportError(ValueError):
    """A model folder this exporter cannot turn into a correct GGUF file."""


@dataclass(frozen=True)
class _LlamaParams:
    """The Llama hyperparameters a GGUF file carries as ``llama.*`` keys."""

    context_length: int
    embedding_length: int
    block_count: int
    feed_forward_length: int
    head_count: int
    head_count_kv: int
    head_dim: int
    rope_freq_base: float
    rms_eps: float
    vocab_size: int
    tied_embeddings: bool


@dataclass(frozen=True)
class _Vocab:
    """The tokenizer as GGUF stores it: tokens by id, their types, merges and ids."""

    tokens: list[str]
    token_types: list[int]
    pre: str
    merges: list[str]
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None


@dataclass(frozen=True)
class _TensorPlan:
    """One tensor to write: where it comes from, its GGUF name, shape and type."""

    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    rope_heads: int  # >0: permute rows for llama.cpp's rope with this many heads


# --------------------------------------------------------------------------- config


def _load_config(model_dir: Path) -> Any:
    """The folder's transformers config, refused unless it is a plain Llama.

    Refusing here, before any weight is read, is what keeps a Mistral/Qwen2/GPT-2
    folder (whose tensors would mostly map to Llama names) from becoming a
    file that loads in llama.cpp and generates nonsense.
    """
    from transformers import AutoConfig

    path = model_dir / "config.json"
    if not path.is_file():
        raise GGUFExportError(f"{model_dir} is not a Hugging Face model folder: no config.json")
    model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    if model_type != "llama":
        raise GGUFExportError(
            f"model_type {model_type!r} is not supported: only 'llama' models can be exported to GGUF")
    cfg = AutoConfig.from_pretrained(str(model_dir))
    archs = getattr(cfg, "architectures", None) or ["LlamaForCausalLM"]
    if "LlamaForCausalLM" not in archs:
        raise GGUFExportError(f"architectures {archs} is not supported: only LlamaForCausalLM can be exported to GGUF")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise GGUFExportError(f"hidden_act {cfg.hidden_act!r} is not supported: llama.cpp's llama uses silu")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise GGUFExportError("attention_bias/mlp_bias models are not supported by this exporter")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise GGUFExportError(f"rope_type {rope_type!r} is not supported: only unscaled rope can be exported")
    return cfg


def _rope_theta(cfg: Any) -> float:
    """rope base frequency, from ``rope_parameters`` (transformers 5) or ``rope_theta`` (older)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise GGUFExportError("config has no rope_theta")
    return float(theta)


def _llama_params(cfg: Any) -> _LlamaParams:
    """Pull the ``llama.*`` hyperparameters out of a Llama config."""
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return _LlamaParams(
        context_length=int(cfg.max_position_embeddings),
        embedding_length=int(cfg.hidden_size),
        block_count=int(cfg.num_hidden_layers),
        feed_forward_length=int(cfg.intermediate_size),
        head_count=heads,
        head_count_kv=int(getattr(cfg, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        rope_freq_base=_rope_theta(cfg),
        rms_eps=float(cfg.rms_norm_eps),
        vocab_size=int(cfg.vocab_size),
        tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
    )


# ------------------------------------------------------------------------ tokenizer


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """The llama.cpp ``tokenizer.ggml.pre`` name matching tokenizer.json's pre-tokenizer.

    llama.cpp does not read tokenizer.json: it splits text with regexes it
    picks by this name, so a wrong name tokenizes differently without any
    error. Only shapes known to match are named; anything else is refused.
    """
    def is_byte_level(p: dict[str, Any], with_regex: bool) -> bool:
        return (p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == with_regex
                and not p.get("add_prefix_space", False))

    if pre is None:
        raise GGUFExportError("tokenizer.json has no pre-tokenizer: not a GPT-2-style byte-level BPE tokenizer")
    if is_byte_level(pre, with_regex=True):
        return _PRE_GPT2
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and is_byte_level(steps[1], with_regex=True)):
        return _PRE_SMOLLM
    if (len(steps) == 2 and steps[0].get("type") == "Split"
            and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT
            and steps[0].get("behavior") == "Isolated" and is_byte_level(steps[1], with_regex=False)):
        return _PRE_LLAMA3
    raise GGUFExportError(
        f"pre-tokenizer {json.dumps(pre)[:120]} has no known llama.cpp name; cannot export the tokenizer")


def _read_vocab(model_dir: Path, vocab_size: int) -> _Vocab:
    """Read a GPT-2-style byte-level BPE tokenizer out of ``tokenizer.json``.

    Tokens are written in tokenizer.json's own byte-level spelling (what
    llama.cpp's ``gpt2`` vocab expects); added special tokens become CONTROL,
    other added tokens USER_DEFINED, so both stay whole when llama.cpp
    tokenizes. Ids the tokenizer leaves unused below ``vocab_size`` (padded
    embedding rows) become UNUSED ``[PAD<id>]`` tokens, since GGUF needs one
    token per embedding row. Merges, special ids and the chat template come
    from gguf's ``SpecialVocab``, which reads the same files llama.cpp's
    converter does.
    """
    from gguf import SpecialVocab, TokenType

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"{model_dir} has no tokenizer.json: a fast (tokenizers) BPE tokenizer is needed")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFExportError(
            f"tokenizer model {model.get('type')!r} is not BPE; only GPT-2-style BPE tokenizers can be exported")
    if model.get("byte_fallback") or data.get("normalizer") is not None:
        raise GGUFExportError(
            "tokenizer is SentencePiece-style BPE (byte_fallback/normalizer), not GPT-2-style byte-level BPE")
    decoder = data.get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        raise GGUFExportError(
            f"tokenizer decoder {decoder.get('type')!r} is not ByteLevel; not a GPT-2-style BPE tokenizer")
    pre = _pre_tokenizer_name(data.get("pre_tokenizer"))

    by_id: dict[int, tuple[str, TokenType]] = {i: (t, TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in data.get("added_tokens", []):
        added_kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], added_kind)
    top = max(by_id) + 1
    if top > vocab_size:
        raise GGUFExportError(f"tokenizer has ids up to {top - 1} but the model's vocab_size is {vocab_size}")
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        text, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))

    special = SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise GGUFExportError("tokenizer.json has no merges; not a BPE tokenizer that can be exported")
    template = special.chat_template
    if template is not None and not isinstance(template, str):  # named templates: keep the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return _Vocab(
        tokens=tokens, token_types=types, pre=pre, merges=list(special.merges),
        special_ids=dict(special.special_token_ids),
        add_bos=bool(special.add_special_token.get("bos", False)),
        add_eos=bool(special.add_special_token.get("eos", False)),
        chat_template=template,
    )


# -------------------------------------------------------------------------- tensors


def _safetensors_files(model_dir: Path) -> list[Path]:
    """The folder's safetensors files (one, or the shards of a sharded save)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{model_dir} has no .safetensors weights (save the model with safe_serialization)")
    return files


def _tensor_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Every tensor's shape and file, read from the headers only."""
    from safetensors import safe_open

    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                shapes[name] = (tuple(sf.get_slice(name).get_shape()), f)
    return shapes


def _ggml_type(shape: tuple[int, ...], gguf_type: str) -> Any:
    """The GGML type a tensor is stored as, following llama.cpp's converter.

    1-D tensors (the RMS norm weights) stay f32: they are tiny and quantizing
    them costs accuracy for nothing. For q8_0, a 2-D matrix is quantized when
    its rows split into whole 32-value blocks, else it falls back to f16.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) < 2:
        return GGMLQuantizationType.F32
    if gguf_type == "q8_0" and shape[-1] % GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0] == 0:
        return GGMLQuantizationType.Q8_0
    return GGMLQuantizationType.F16


def _plan_tensors(shapes: dict[str, tuple[tuple[int, ...], Path]], params: _LlamaParams,
                  gguf_type: str) -> list[_TensorPlan]:
    """Map HF tensor names to GGUF names (gguf's ``TensorNameMap``) and pick their types.

    With tied embeddings no ``output.weight`` is written: llama.cpp and
    transformers both reuse ``token_embd.weight``, and its absence is how
    transformers' GGUF loader decides ``tie_word_embeddings``.
    """
    from gguf import MODEL_ARCH, MODEL_TENSOR, get_tensor_name_map

    name_map = get_tensor_name_map(MODEL_ARCH.LLAMA, params.block_count)
    plan: list[_TensorPlan] = []
    for hf_name in sorted(shapes, key=_natural_key):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some old checkpoints saved; rope is recomputed from rope.freq_base
        if hf_name == "lm_head.weight" and params.tied_embeddings:
            continue
        found = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise GGUFExportError(f"tensor {hf_name!r} has no GGUF name (is this a merged Llama model?)")
        kind, gguf_name = found
        shape = shapes[hf_name][0]
        heads = {MODEL_TENSOR.ATTN_Q: params.head_count, MODEL_TENSOR.ATTN_K: params.head_count_kv}.get(kind, 0)
        plan.append(_TensorPlan(hf_name, gguf_name, shape, _ggml_type(shape, gguf_type), heads))
    names = {p.gguf_name for p in plan}
    if "token_embd.weight" not in names:
        raise GGUFExportError("the weights have no model.embed_tokens.weight")
    if not params.tied_embeddings and "output.weight" not in names:
        raise GGUFExportError("tie_word_embeddings is false but the weights have no lm_head.weight")
    return plan


def _natural_key(name: str) -> list[Any]:
    """Sort ``layers.10`` after ``layers.9``, so the file lists blocks in order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _permute_for_rope(w: "np.ndarray", n_heads: int) -> "np.ndarray":
    """Reorder q/k projection rows from HF's rope layout to llama.cpp's.

    HF's Llama rotates dimension i of each head together with i + head_dim/2
    (``rotate_half``); llama.cpp's Llama rope (``LLAMA_ROPE_TYPE_NORM``) rotates
    adjacent pairs (2i, 2i+1). Moving row i + head_dim/2 next to row i in each
    head of W_q and W_k makes ggml rotate the same pairs; q.k is unchanged
    because both get the same reordering. transformers' GGUF loader undoes
    exactly this (``LlamaTensorProcessor``), so a round trip is the identity.
    """
    rows, *rest = w.shape
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *rest).swapaxes(1, 2).reshape(w.shape)


def _nbytes(p: _TensorPlan) -> int:
    """How many bytes a planned tensor takes in the file (GGUFWriter needs it up front)."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[p.qtype]
    count = 1
    for dim in p.shape:
        count *= dim
    return count // block * size


def _encode_all(plan: list[_TensorPlan],
                shapes: dict[str, tuple[tuple[int, ...], Path]]) -> Iterator["np.ndarray"]:
    """Each planned tensor as GGUF stores it, one at a time.

    Yielding one tensor at a time keeps memory at about one float32 matrix
    rather than the whole model; weights are widened to float32 first so
    bf16 checkpoints convert, then cast or quantized by ``gguf.quants``.
    """
    import contextlib

    import torch
    from gguf.quants import quantize
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}
        for p in plan:
            src = shapes[p.hf_name][1]
            if src not in handles:
                handles[src] = stack.enter_context(safe_open(str(src), framework="pt"))
            w = handles[src].get_tensor(p.hf_name).to(torch.float32).numpy()
            if p.rope_heads:
                w = _permute_for_rope(w, p.rope_heads)
            yield quantize(w, p.qtype)


# -------------------------------------------------------------------------- writing


def _add_metadata(writer: Any, params: _LlamaParams, vocab: _Vocab, gguf_type: str, name: str) -> None:
    """Write the general, ``llama.*`` and ``tokenizer.*`` keys through GGUFWriter's helpers."""
    from gguf import GGML_QUANT_VERSION, LlamaFileType

    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(params.context_length)
    writer.add_embedding_length(params.embedding_length)
    writer.add_block_count(params.block_count)
    writer.add_feed_forward_length(params.feed_forward_length)
    writer.add_head_count(params.head_count)
    writer.add_head_count_kv(params.head_count_kv)
    writer.add_rope_dimension_count(params.head_dim)
    if params.head_dim * params.head_count != params.embedding_length:
        writer.add_key_length(params.head_dim)
        writer.add_value_length(params.head_dim)
    writer.add_rope_freq_base(params.rope_freq_base)
    writer.add_layer_norm_rms_eps(params.rms_eps)
    writer.add_vocab_size(params.vocab_size)
    writer.add_file_type(LlamaFileType.MOSTLY_Q8_0 if gguf_type == "q8_0" else LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special_ids.items():
        adder = getattr(writer, f"add_{kind}_token_id", None)
        if adder is not None:
            adder(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)


def write_gguf(model_dir: Path, out_path: Path, gguf_type: str = "f16") -> Path:
    """Convert a merged HF Llama folder into one GGUF file (``f16`` or ``q8_0``).

    The file gets the ``llama.*`` hyperparameters, the byte-level BPE
    tokenizer (tokens, types, merges, special ids, add-bos/eos flags, chat
    template) and the weights: q/k rows permuted for llama.cpp's rope, norms
    in f32, matrices in f16 or q8_0, no ``output.weight`` when embeddings are
    tied. It is written next to ``out_path`` and renamed into place, so a
    crash never leaves a half-written file under the final name. Everything
    that could make the file wrong is checked before writing starts.
    """
    import numpy as np
    from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFWriter

    model_dir, out_path = Path(model_dir), Path(out_path)
    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"gguf_type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    params = _llama_params(_load_config(model_dir))
    vocab = _read_vocab(model_dir, params.vocab_size)
    shapes = _tensor_shapes(_safetensors_files(model_dir))
    plan = _plan_tensors(shapes, params, gguf_type)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f"{out_path.name}.tmp{os.getpid()}")
    writer = GGUFWriter(tmp, MODEL_ARCH_NAMES[MODEL_ARCH.LLAMA])
    try:
        _add_metadata(writer, params, vocab, gguf_type, model_dir.name)
        for p in plan:
            writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), _nbytes(p), raw_dtype=p.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for data in _encode_all(plan, shapes):
            writer.write_tensor_data(data)
        writer.close()
        os.replace(tmp, out_path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return out_path


# ------------------------------------------------------------------------ verifying


def _texts_to_check(tokenizer: Any, prompts: list[str]) -> list[str]:
    """The prompts, plus each rendered through the chat template when there is one.

    The rendered form carries the special tokens (``<|im_start|>``...), so a
    GGUF tokenizer that splits them into pieces fails the id check.
    """
    texts = list(prompts)
    if getattr(tokenizer, "chat_template", None):
        for prompt in prompts:
            texts.append(tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True))
    return texts


def _logit_stats(reference: list[Any], candidate: list[Any]) -> dict[str, float]:
    """Max abs/relative logit difference and top-1 agreement over all positions."""
    import torch

    ref = torch.cat([r.reshape(-1, r.shape[-1]) for r in reference])
    cand = torch.cat([c.reshape(-1, c.shape[-1]) for c in candidate])
    max_abs = float((ref - cand).abs().max())
    return {
        "max_abs_logit_diff": max_abs,
        "max_rel_logit_diff": max_abs / max(float(ref.abs().max()), 1e-12),
        "top1_agreement": float((ref.argmax(-1) == cand.argmax(-1)).float().mean()),
        "positions": int(ref.shape[0]),
    }


def verify_gguf(model_dir: Path, gguf_path: Path, prompts: list[str]) -> dict[str, Any]:
    """Load a GGUF back with transformers and compare it with the folder it came from.

    Checks, on ``prompts``: the GGUF tokenizer gives the same ids as the
    folder's tokenizer (on the raw prompts and on their chat-template
    renderings), the chat template survived verbatim, and the two models'
    float32 CPU logits agree. Both models are fed the original tokenizer's
    ids, so a tokenizer mismatch and a weight mismatch are reported apart.
    Returns the figures rather than judging them: the tolerance that is
    right for f16 is too tight for q8_0.

    transformers rebuilds a GGUF tokenizer from ``tokenizer.ggml.pre`` and
    knows fewer names than llama.cpp: for ``smollm`` (digits split one by
    one) it splits like plain GPT-2, so ``tokenizer_match`` can be False on
    prompts with numbers while llama.cpp itself tokenizes them correctly.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, gguf_path = Path(model_dir), Path(gguf_path)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if not prompts or not all(tok(p)["input_ids"] for p in prompts):
        raise ValueError("verify_gguf needs prompts, each of at least one token")
    src, name = str(gguf_path.parent), gguf_path.name
    gguf_tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    texts = _texts_to_check(tok, prompts)
    special = ("bos_token_id", "eos_token_id", "pad_token_id")
    tokenizer_match = (all(getattr(tok, a) == getattr(gguf_tok, a) for a in special)
                       and all(tok(t)["input_ids"] == gguf_tok(t)["input_ids"] for t in texts))

    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    candidate = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32).eval()
    ref_logits, cand_logits = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tok(prompt)["input_ids"]])
            ref_logits.append(reference(input_ids=ids).logits)
            cand_logits.append(candidate(input_ids=ids).logits)

    stats = _logit_stats(ref_logits, cand_logits)
    return {
        "gguf_type": _gguf_type_of(gguf_path),
        "path": str(gguf_path),
        "bytes": gguf_path.stat().st_size,
        **stats,
        "tokenizer_match": tokenizer_match,
        "chat_template_match": getattr(tok, "chat_template", None) == getattr(gguf_tok, "chat_template", None),
    }


def _gguf_type_of(gguf_path: Path) -> str:
    """``f16``/``q8_0``, as the file's ``general.file_type`` says.

    transformers' own metadata reader skips the token arrays and takes
    milliseconds; gguf's ``GGUFReader`` parses all ~100k token and merge
    strings (seconds), so it is only the fallback.
    """
    from gguf import Keys, LlamaFileType

    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:  # an older transformers: parse with gguf itself
        from gguf import GGUFReader

        field = GGUFReader(gguf_path).get_field(Keys.General.FILE_TYPE)
        file_type = None if field is None else int(field.contents())
    else:
        file_type = read_gguf_metadata(str(gguf_path))[0].get(Keys.General.FILE_TYPE)
    if file_type is None:
        return "unknown"
    names = {LlamaFileType.MOSTLY_F16: "f16", LlamaFileType.MOSTLY_Q8_0: "q8_0"}
    return names.get(LlamaFileType(file_type), LlamaFileType(file_type).name.lower())
