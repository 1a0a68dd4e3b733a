"""GGUF export: round trips through transformers' GGUF loader, file metadata, refusals.

The tiny fixture model (4 heads, 2 kv heads) exercises the q/k row
permutation for both head counts. Its random init gives near-uniform
attention, where rope, and so a permutation bug, barely moves the logits;
the untied model below therefore gets sharpened q/k projections, so a
layout bug there moves the logits by orders of magnitude more than f16
rounding does.

Most of the run time is transformers parsing the 49k-token vocabulary out of
each GGUF (seconds per load), so files and verify results are shared per module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from ray_qlora.export.gguf import GGUF_TYPES, GGUFExportError, verify_gguf, write_gguf

PROMPTS = [
    "Hello, world!",
    "The capital of France is Paris, and 12 + 30 = 42.",
    "  Indented <code> and émojis 🙂 too",
]

# fp16 keeps 11 significant bits: each weight is off by at most u = 2**-11
# relative. Over two layers the logits measured ~0.6u (max abs diff / max
# abs logit); 4u leaves headroom for that, while the q/k permutation bug
# below is >100x larger.
F16_REL_TOL = 4 * 2.0**-11
# q8_0 rounds each weight to one of 255 steps of its 32-value block's absmax:
# an error up to 1/254 of the block's largest weight. Measured logits are
# off by about 2-3 such steps; allow 8.
Q8_REL_TOL = 8 / 254


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Both GGUF types of the tiny model, each written and verified once."""
    out = tmp_path_factory.mktemp("gguf")
    results = {}
    for gguf_type in GGUF_TYPES:
        path = write_gguf(tiny_model_dir, out / f"tiny-{gguf_type}.gguf", gguf_type)
        results[gguf_type] = verify_gguf(tiny_model_dir, path, PROMPTS)
    return results


@pytest.fixture(scope="module")
def q8_reader(exported: dict[str, dict[str, Any]]) -> Any:
    """gguf's own reader over the q8_0 file: what llama.cpp will see.

    One file is enough for the metadata, which both types share; q8_0 is the
    one whose per-tensor types (quantized vs f32) have rules to check.
    """
    from gguf import GGUFReader

    return GGUFReader(exported["q8_0"]["path"])


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    assert field is not None, f"{key} missing from the GGUF"
    return field.contents()


def test_f16_round_trip_gives_the_same_logits(exported: dict[str, dict[str, Any]]) -> None:
    r = exported["f16"]
    assert r["gguf_type"] == "f16"
    assert r["max_rel_logit_diff"] < F16_REL_TOL, r
    assert r["top1_agreement"] == 1.0, r
    assert r["tokenizer_match"] and r["chat_template_match"], r


def test_q8_0_is_smaller_and_still_close(exported: dict[str, dict[str, Any]]) -> None:
    f16, q8 = exported["f16"], exported["q8_0"]
    assert q8["gguf_type"] == "q8_0"
    # q8_0 stores 34 bytes per 32 weights against f16's 64; the tokenizer
    # metadata (same in both) keeps the whole-file ratio above 34/64.
    assert q8["bytes"] < 0.7 * f16["bytes"], (q8["bytes"], f16["bytes"])
    assert q8["max_rel_logit_diff"] < Q8_REL_TOL, q8
    assert q8["max_rel_logit_diff"] > f16["max_rel_logit_diff"], "q8_0 should lose more than f16 (was it quantized?)"
    assert q8["top1_agreement"] >= 0.9, q8
    assert q8["tokenizer_match"] and q8["chat_template_match"], q8


def test_metadata_describes_the_model_and_tokenizer(q8_reader: Any, tiny_model_dir: Path) -> None:
    from gguf import LlamaFileType, TokenType
    from transformers import AutoTokenizer

    reader = q8_reader
    expected = {
        "general.file_type": int(LlamaFileType.MOSTLY_Q8_0),
        "general.architecture": "llama",
        "llama.block_count": 2,
        "llama.context_length": 512,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.vocab_size": 49152,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
    }
    assert {k: _field(reader, k) for k in expected} == expected
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)

    template = AutoTokenizer.from_pretrained(str(tiny_model_dir)).chat_template
    assert template and _field(reader, "tokenizer.chat_template") == template
    assert len(reader.get_field("tokenizer.ggml.tokens").data) == 49152
    assert len(reader.get_field("tokenizer.ggml.merges").data) > 40000
    types = reader.get_field("tokenizer.ggml.token_type")
    im_start = int(types.parts[types.data[1]][0])  # id 1 is <|im_start|>
    assert im_start == TokenType.CONTROL


def test_q8_0_tensor_types_and_tied_embeddings(q8_reader: Any) -> None:
    from gguf import GGMLQuantizationType as Q

    tensors = {t.name: t for t in q8_reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert len(tensors) == 1 + 2 * 9 + 1  # embeddings, 9 per block, final norm
    for name, t in tensors.items():  # norms stay f32, every matrix (rows of 64/128) is q8_0
        assert t.tensor_type == (Q.F32 if len(t.shape) == 1 else Q.Q8_0), (name, t.tensor_type.name)
    # GGUF lists dims innermost first: k is (kv_heads * head_dim) rows of 64
    assert [int(d) for d in tensors["blk.0.attn_k.weight"].shape] == [64, 32]


def test_qk_permutation_is_what_transformers_undoes() -> None:
    """Our llama.cpp rope layout is exactly the one transformers' loader reverses."""
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from ray_qlora.export.gguf import _permute_for_rope

    rng = np.random.default_rng(0)
    heads, kv_heads, head_dim, hidden = 4, 2, 16, 64
    processor = LlamaTensorProcessor(config={"num_attention_heads": heads, "num_key_value_heads": kv_heads})
    for name, n in (("blk.0.attn_q.weight", heads), ("blk.0.attn_k.weight", kv_heads)):
        w = rng.standard_normal((n * head_dim, hidden)).astype(np.float32)
        permuted = _permute_for_rope(w, n)
        assert not np.array_equal(permuted, w)
        assert np.array_equal(processor.process(permuted, name).weights, w), name


@pytest.fixture(scope="module")
def untied_model_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with its own lm_head and sharp (position-sensitive) attention."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("untied-model")
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:  # 8x q and k: attention scores 64x, far from uniform
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def test_untied_embeddings_round_trip(untied_model_dir: Path, tmp_path: Path) -> None:
    from gguf import GGUFReader

    path = write_gguf(untied_model_dir, tmp_path / "untied.gguf")
    assert "output.weight" in {t.name for t in GGUFReader(path).tensors}
    r = verify_gguf(untied_model_dir, path, PROMPTS)
    assert r["max_rel_logit_diff"] < F16_REL_TOL, r
    assert r["top1_agreement"] == 1.0, r


def test_verify_catches_a_qk_layout_bug(untied_model_dir: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import ray_qlora.export.gguf as gguf_export

    monkeypatch.setattr(gguf_export, "_permute_for_rope", lambda w, n_heads: w)
    r = verify_gguf(untied_model_dir, write_gguf(untied_model_dir, tmp_path / "bad.gguf"), PROMPTS)
    assert r["max_rel_logit_diff"] > 100 * F16_REL_TOL, r
    assert r["top1_agreement"] < 0.9, r


def _save_tiny(model_type: str, out: Path) -> Path:
    """A small non-Llama causal LM folder, saved like any HF checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {"qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=256),
             "gpt2": dict(n_embd=32, n_layer=1, n_head=2, vocab_size=256, n_positions=64)}[model_type]
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes)).save_pretrained(out)
    return out


@pytest.mark.parametrize("model_type", ["qwen2", "gpt2"])
def test_refuses_non_llama_models(model_type: str, tokenizer_dir: Path, tmp_path: Path) -> None:
    model_dir = _save_tiny(model_type, tmp_path / model_type)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, model_dir / f.name)
    out = tmp_path / "out.gguf"
    with pytest.raises(GGUFExportError, match=f"model_type '{model_type}'"):
        write_gguf(model_dir, out)
    assert not out.exists()


def _copy_with_tokenizer(src: Path, dst: Path, edit: Any) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / "tokenizer.json").read_text(encoding="utf-8"))
    edit(data)
    (dst / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return dst


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t["model"].update(byte_fallback=True), "SentencePiece-style"),
    (lambda t: t.update(pre_tokenizer={"type": "Metaspace", "replacement": "\u2581"}), "pre-tokenizer"),
    (lambda t: t["model"].update(type="WordPiece"), "not BPE"),
])
def test_refuses_tokenizers_llama_cpp_would_misread(edit: Any, message: str, tiny_model_dir: Path,
                                                    tmp_path: Path) -> None:
    model_dir = _copy_with_tokenizer(tiny_model_dir, tmp_path / "model", edit)
    with pytest.raises(GGUFExportError, match=message):
        write_gguf(model_dir, tmp_path / "out.gguf")


def test_refuses_unknown_gguf_type(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(GGUFExportError, match="q4_0"):
        write_gguf(tiny_model_dir, tmp_path / "out.gguf", "q4_0")
