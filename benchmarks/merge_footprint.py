"""What merging buys at inference, and what 4-bit and the merged export cost in bytes, in one run.

1. Latency: greedy generation of a fixed number of new tokens (EOS held off
   with min_new_tokens, so every model produces the same count) on the sample
   task's prompts, by (a) the 16-bit base, (b) the base + a LoRA adapter left
   unmerged (peft, r=16 on all linear layers, its B matrices perturbed so it
   really changes the model) and (c) that adapter merged the way the merge
   stage does it (merge_and_unload, saved with save_pretrained, reloaded).
   One warm-up pass each, then --repeats timed passes in which every generate
   call is run by the three models back to back (rotating who goes first), so
   background load hits them alike; the ratios are medians of these paired
   calls' ratios. Also, as the merge stage verifies an export: how often the
   merged model's greedy output equals the unmerged one's (merge.verify_*
   defaults: 8 other prompts, up to 32 tokens, EOS allowed), and the largest
   next-token logit difference between them next to the adapter's own effect.
2. Bytes per parameter of the 4-bit layers: every bitsandbytes Linear4bit of
   the base as ``load_4bit_base`` loads it (NF4 + double quantization),
   counting the packed weight and every tensor of its quant_state (8-bit
   absmax, the nested fp32 absmax and offset, the NF4 and 8-bit lookup
   tables); the same with double_quant off as the baseline.
3. Footprint: bytes on disk of the merged safetensors vs the base's, their
   parameter counts, and the base's bytes in memory in 4-bit vs 16-bit.

    python benchmarks/merge_footprint.py                              # SmolLM2-135M (embedded)
    python benchmarks/merge_footprint.py --base DIR --new-tokens 8 --repeats 2 --prompts 2   # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_T0 = time.perf_counter()
# Theoretical bits per parameter: 4-bit codes, one absmax per 64 weights (8-bit with double quantization,
# fp32 without), one fp32 second-level absmax per 256 absmax values.
THEORY_DQ = (4 + 8 / 64 + 32 / (64 * 256)) / 8
THEORY_SQ = (4 + 32 / 64) / 8


def _log(msg: str) -> None:
    print(f"[merge_footprint {time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size()


def _unique_bytes(tensors: Any, seen: set[tuple[int, int]]) -> int:
    """Bytes of the tensors not already in ``seen`` (tied or shared storage counts once)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        key = (t.data_ptr(), _nbytes(t))
        if key not in seen:
            seen.add(key)
            total += _nbytes(t)
    return total


def _quant_tensors(qs: Any) -> dict[str, list[Any]]:
    """A Linear4bit's quant_state tensors by kind."""
    parts: dict[str, list[Any]] = {"absmax": [qs.absmax], "nested": [], "tables": [qs.code]}
    if qs.state2 is not None:  # double quantization: absmax is 8-bit, with its own fp32 absmax and an offset
        parts["nested"] += [qs.state2.absmax, qs.offset]
        parts["tables"].append(qs.state2.code)
    return parts


def quant_bytes(model: Any) -> dict[str, Any]:
    """Bytes per parameter over every bitsandbytes Linear4bit layer: packed weight + quant_state tensors.

    ``per_param`` counts everything the layers hold; ``payload_per_param`` leaves out the lookup tables
    (16 NF4 values, and 256 values of the 8-bit map with double quantization), a fixed cost per layer
    that stops being negligible only in very small layers.
    """
    import bitsandbytes as bnb

    seen: set[tuple[int, int]] = set()
    sums = {"params": 0, "packed": 0, "absmax": 0, "nested": 0, "tables": 0}
    per_layer = []
    layers = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        qs = module.weight.quant_state
        params = math.prod(qs.shape)
        layer = {"packed": _unique_bytes([module.weight.data], seen)}
        for kind, tensors in _quant_tensors(qs).items():
            layer[kind] = _unique_bytes(tensors, seen)
        for kind, n in layer.items():
            sums[kind] += n
        sums["params"] += params
        per_layer.append(sum(layer.values()) / params)
        layers += 1
    if not layers:
        raise RuntimeError("no bitsandbytes Linear4bit layer in the 4-bit model")
    total = sums["packed"] + sums["absmax"] + sums["nested"] + sums["tables"]
    return {**sums, "layers": layers, "bytes": total, "per_param": total / sums["params"],
            "payload_per_param": (total - sums["tables"]) / sums["params"],
            "layer_min": min(per_layer), "layer_max": max(per_layer)}


def memory_bytes(model: Any) -> int:
    """Bytes a loaded model holds: parameters and buffers (shared storage once) + 4-bit quant states."""
    import bitsandbytes as bnb

    seen: set[tuple[int, int]] = set()
    total = _unique_bytes(list(model.parameters()) + list(model.buffers()), seen)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.weight.quant_state is not None:
            total += _unique_bytes([t for ts in _quant_tensors(module.weight.quant_state).values() for t in ts],
                                   seen)
    return total


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once


def saved_dtype(folder: Path) -> str:
    cfg = json.loads((Path(folder) / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return name if name in ("bfloat16", "float16", "float32") else "float32"


def prompts(n: int, seed: int = 3) -> list[list[dict[str, str]]]:
    """The sample task's prompts: a system instruction and a medication order."""
    from ray_qlora.data.sample import SYSTEM_PROMPT, make_orders

    return [[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": o["order"]}]
            for o in make_orders(n, seed=seed)]


def make_adapter(base_path: Path, run_dtype: str, device: str, rel_norm: float, out: Path) -> dict[str, Any]:
    """attach_lora (r=16, all linear) on the 16-bit base, B perturbed so that ||dW|| = rel_norm * ||W||."""
    import torch

    from ray_qlora.config import LoraConfig
    from ray_qlora.modeling import attach_lora, load_16bit

    torch.manual_seed(0)
    lora = LoraConfig()
    model = attach_lora(load_16bit(base_path, run_dtype, device), lora, gradient_checkpointing=False)
    n = 0
    with torch.no_grad():
        for module in model.modules():
            if not (hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})):
                continue
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            b.copy_(torch.randn_like(b))
            delta = module.scaling["default"] * (b.float() @ a.float())
            b.mul_(rel_norm * module.base_layer.weight.float().norm() / delta.norm())
            n += 1
    model.save_pretrained(out)
    return {"r": lora.r, "alpha": lora.alpha, "lora_layers": n, "rel_norm": rel_norm}


def _hf_model(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _timed_pass(model: Any, tok: Any, convs: list, new_tokens: int, batch: int,
                force_length: bool = True) -> tuple[float, list[dict]]:
    from ray_qlora.generation import generate

    # forced: no early EOS, so every model generates the same number of tokens
    _hf_model(model).generation_config.min_new_tokens = new_tokens if force_length else None
    start = time.perf_counter()
    out = generate(model, tok, convs, new_tokens, batch_size=batch)
    return time.perf_counter() - start, out


def _last_logits(model: Any, tok: Any, convs: list) -> Any:
    """Next-token logits after each prompt (one forward, no generation)."""
    import torch

    tok.padding_side = "left"
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(_hf_model(model).device)
    with torch.inference_mode():
        return model(**enc).logits[:, -1, :].float().cpu()


def footprint_4bit(base_path: Path, device: str, store_dtype: str) -> dict[str, Any]:
    """Bytes per parameter of the 4-bit layers (double vs single quantization) and whole-model bytes."""
    import gc

    from ray_qlora.config import QuantizationConfig
    from ray_qlora.modeling import compute_dtype_name, load_4bit_base

    out: dict[str, Any] = {}
    _log("loading the 4-bit base: NF4 + double quantization (QuantizationConfig defaults)")
    model = load_4bit_base(base_path, QuantizationConfig(), device)
    out["double"] = quant_bytes(model)
    out["memory_4bit_here"] = memory_bytes(model)
    out["compute_here"] = compute_dtype_name(QuantizationConfig(), device)
    del model
    gc.collect()
    _log("loading the 4-bit base: NF4, single quantization (double_quant=False)")
    model = load_4bit_base(base_path, QuantizationConfig(double_quant=False), device)
    out["single"] = quant_bytes(model)
    del model
    gc.collect()
    if store_dtype != out["compute_here"]:
        _log(f"loading the 4-bit base with its unquantized weights in {store_dtype} (as on a GPU)")
        model = load_4bit_base(base_path, QuantizationConfig(compute_dtype=store_dtype), device)
        out["memory_4bit"] = memory_bytes(model)
        del model
        gc.collect()
    else:
        out["memory_4bit"] = out["memory_4bit_here"]
    return out


def latency(base_path: Path, device: str, run_dtype: str, merge_dtype: str, args: argparse.Namespace,
            tmp: Path) -> dict[str, Any]:
    """Base, unmerged and merged models: timed greedy passes, output agreement, export bytes."""
    import gc

    import torch
    from peft import PeftModel

    from ray_qlora.config import MergeConfig
    from ray_qlora.merge import _save_export  # the merge stage's own export (safetensors + tokenizer + gen config)
    from ray_qlora.modeling import load_16bit, load_tokenizer, torch_dtype

    adapter_dir, merged_dir = tmp / "adapter", tmp / "merged"
    _log(f"making the adapter: attach_lora on the base in {run_dtype}, lora_B perturbed "
         f"(||dW|| = {args.adapter_norm} ||W||)")
    adapter = make_adapter(base_path, run_dtype, device, args.adapter_norm, adapter_dir)
    gc.collect()

    _log(f"merging like the merge stage: base + adapter -> merge_and_unload -> {merge_dtype} -> save_pretrained")
    tok = load_tokenizer(base_path)
    to_merge = PeftModel.from_pretrained(load_16bit(base_path, run_dtype, device), str(adapter_dir))
    merged = to_merge.merge_and_unload().to(torch_dtype(merge_dtype))
    _save_export(merged, tok, merged_dir)
    del merged, to_merge
    gc.collect()

    _log("loading the three models: base, base + adapter (unmerged), merged (reloaded)")
    models = {"base": load_16bit(base_path, run_dtype, device)}
    models["unmerged"] = PeftModel.from_pretrained(load_16bit(base_path, run_dtype, device), str(adapter_dir))
    models["unmerged"].eval()
    models["merged"] = load_16bit(merged_dir, run_dtype, device)
    toks = {"base": tok, "unmerged": tok, "merged": load_tokenizer(merged_dir)}
    convs = prompts(args.prompts)

    chunks = [convs[i:i + args.batch_size] for i in range(0, len(convs), args.batch_size)]
    order = list(models)
    outputs: dict[str, list[dict]] = {name: [] for name in models}
    for name, model in models.items():
        _log(f"warm-up pass: {name} ({len(convs)} prompts x {args.new_tokens} new tokens)")
        for chunk in chunks:
            outputs[name] += _timed_pass(model, toks[name], chunk, args.new_tokens, args.batch_size)[1]
    # Paired design: each generate call (one chunk of prompts) is run by the three models back to back,
    # in rotating order, so a burst of background load hits all three; ratios are medians over these triples.
    times: dict[str, list[list[float]]] = {name: [[] for _ in range(args.repeats)] for name in models}
    pairs: list[dict[str, float]] = []
    for rep in range(args.repeats):
        for ci, chunk in enumerate(chunks):
            k = (rep * len(chunks) + ci) % 3
            unit = {}
            for name in order[k:] + order[:k]:
                unit[name] = _timed_pass(models[name], toks[name], chunk, args.new_tokens, args.batch_size)[0]
                times[name][rep].append(unit[name])
            pairs.append(unit)
        _log(f"repeat {rep + 1}/{args.repeats}: " + "  ".join(f"{n} {sum(times[n][rep]):.2f}s" for n in order))

    verify = MergeConfig()
    vconvs = prompts(verify.verify_prompts, seed=11)
    _log(f"verification like the merge stage: {len(vconvs)} other prompts, greedy, up to "
         f"{verify.verify_max_new_tokens} tokens, batched, EOS allowed")
    natural = {name: _timed_pass(models[name], toks[name], vconvs, verify.verify_max_new_tokens, 8,
                                 force_length=False)[1] for name in order}
    _log("logits after each prompt: merged vs unmerged vs base")
    logits = {name: _last_logits(m, toks[name], convs) for name, m in models.items()}

    def agree(a: str, b: str, outs: dict[str, list[dict]]) -> float:
        return sum(x["text"] == y["text"] for x, y in zip(outs[a], outs[b])) / len(outs[a])

    params = {"base": n_params(models["base"]), "merged": n_params(models["merged"])}
    del models
    gc.collect()
    per_pass_tokens = len(convs) * args.new_tokens
    passes = {name: [sum(r) for r in reps] for name, reps in times.items()}
    lat = {name: {"median_s": statistics.median(ts), "runs_s": ts,
                  "ms_per_token": 1000 * statistics.median(ts) / per_pass_tokens} for name, ts in passes.items()}
    paired = {f"{a}_over_{b}": statistics.median(u[a] / u[b] for u in pairs)
              for a, b in (("merged", "base"), ("merged", "unmerged"), ("unmerged", "base"))}
    return {
        "adapter": adapter, "latency": lat, "paired": paired, "timed_calls": len(pairs), "prompts": len(convs),
        "equal_lengths": all(o["completion_tokens"] == args.new_tokens for outs in outputs.values() for o in outs),
        "match_rate": agree("unmerged", "merged", natural),
        "match_rate_forced": agree("unmerged", "merged", outputs),
        "adapter_changed_rate": 1 - agree("base", "unmerged", natural),
        "verify_prompts": len(vconvs), "verify_max_new_tokens": verify.verify_max_new_tokens,
        "verify_min_match": verify.verify_min_match,
        "max_logit_diff_merged_vs_unmerged": float((logits["merged"] - logits["unmerged"]).abs().max()),
        "max_logit_diff_unmerged_vs_base": float((logits["unmerged"] - logits["base"]).abs().max()),
        "mismatches": [{"prompt": c[-1]["content"], "unmerged": u["text"], "merged": m["text"]}
                       for c, u, m in zip(vconvs, natural["unmerged"], natural["merged"]) if u["text"] != m["text"]],
        "params": params,
        "disk": {"base": disk_bytes(base_path), "merged": disk_bytes(merged_dir)},
        "torch_threads": torch.get_num_threads(),
    }


def _mb(n: float) -> str:
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2-135m-instruct",
                   help="model reference: the embedded alias, a local HF folder (what model.base takes)")
    p.add_argument("--new-tokens", type=int, default=16, help="new tokens per prompt (EOS held off)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per model, after one warm-up")
    p.add_argument("--prompts", type=int, default=3, help="sample-task prompts per pass")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per generate call (1: per-request latency)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="dtype the models run in; auto: the base's own on a GPU, float32 on a CPU")
    p.add_argument("--merge-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="dtype the merged model is saved in; auto: the base's saved dtype")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; default 1 on a CPU (on a shared 2-core machine, 2 threads ran "
                        "greedy decoding 6x slower than 1), torch's own on a GPU")
    p.add_argument("--adapter-norm", type=float, default=0.05,
                   help="size of each layer's LoRA update relative to its weight (Frobenius norms)")
    args = p.parse_args(argv)
    global _T0
    _T0 = time.perf_counter()

    from ray_qlora.config import ModelConfig, StorageConfig
    from ray_qlora.generation import inference_dtype
    from ray_qlora.modeling import pick_device, resolve_base

    import torch

    device = pick_device()
    threads = args.threads or (1 if device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    _log(f"resolving base {args.base!r}")
    base_path = resolve_base(ModelConfig(base=args.base), StorageConfig())
    store_dtype = saved_dtype(base_path)
    run_dtype = inference_dtype(store_dtype, device) if args.dtype == "auto" else args.dtype
    merge_dtype = store_dtype if args.merge_dtype == "auto" else args.merge_dtype
    _log(f"base {base_path} (saved in {store_dtype}); device {device}, running in {run_dtype}, "
         f"merged saved in {merge_dtype}")

    from ray_qlora.modeling import load_16bit

    q = footprint_4bit(base_path, device, store_dtype)
    _log(f"loading the unquantized base in {store_dtype} for its memory footprint")
    m16 = load_16bit(base_path, store_dtype, device)
    memory_16 = memory_bytes(m16)
    del m16
    with tempfile.TemporaryDirectory() as tmp:
        g = latency(base_path, device, run_dtype, merge_dtype, args, Path(tmp))

    lat = g["latency"]
    dq, sq = q["double"], q["single"]
    res: dict[str, Any] = {
        "device": device, "base": str(base_path), "dtype": run_dtype, "merge_dtype": merge_dtype,
        **{k: v for k, v in g.items() if k != "paired"},
        **g["paired"],  # merged_over_base, merged_over_unmerged, unmerged_over_base: medians of paired ratios
        "pass_merged_over_base": lat["merged"]["median_s"] / lat["base"]["median_s"],
        "pass_merged_over_unmerged": lat["merged"]["median_s"] / lat["unmerged"]["median_s"],
        "quant": {"double": dq, "single": sq},
        "bytes_per_param": dq["per_param"], "bytes_per_param_single": sq["per_param"],
        "double_over_single": dq["per_param"] / sq["per_param"],
        "payload_per_param": dq["payload_per_param"], "payload_per_param_single": sq["payload_per_param"],
        "disk_ratio": g["disk"]["merged"] / g["disk"]["base"],
        "params_equal": g["params"]["base"] == g["params"]["merged"],
        "memory": {"unquantized": memory_16, "4bit": q["memory_4bit"], "4bit_here": q["memory_4bit_here"],
                   "unquantized_dtype": store_dtype, "4bit_here_compute": q["compute_here"]},
        "memory_ratio": q["memory_4bit"] / memory_16,
    }
    res["seconds"] = time.perf_counter() - _T0

    w = 46
    print()
    print(f"== generation latency: {g['prompts']} prompts x {args.new_tokens} new tokens, greedy, batch "
          f"{args.batch_size}, {run_dtype} on {device} (torch threads: {res['torch_threads']}), median of "
          f"{args.repeats} after a warm-up")
    for name, label in (("base", f"(a) base, {run_dtype}"),
                        ("unmerged", f"(b) base + LoRA r={g['adapter']['r']} x{g['adapter']['lora_layers']} "
                                     "(unmerged)"),
                        ("merged", "(c) merged, saved + reloaded")):
        r = lat[name]
        print(f"  {label:<{w}} {r['median_s']:8.3f} s/pass  {r['ms_per_token']:7.2f} ms/token  "
              f"(runs {', '.join(f'{s:.3f}' for s in r['runs_s'])})")
    print(f"  ratios: median over {g['timed_calls']} paired calls (the three models back to back); "
          "in brackets, ratio of the pass medians above")
    print(f"  ratio merged / base:       {res['merged_over_base']:.3f}  ({res['pass_merged_over_base']:.3f})  "
          "target <= 1.05: merging adds nothing")
    print(f"  ratio merged / unmerged:   {res['merged_over_unmerged']:.3f}  ({res['pass_merged_over_unmerged']:.3f})  "
          "what merging saves")
    print(f"  ratio unmerged / base:     {res['unmerged_over_base']:.3f}  what an unmerged adapter costs")
    print(f"  equal lengths: {res['equal_lengths']};  merged == unmerged greedy outputs: "
          f"{res['match_rate']:.0%} of {res['verify_prompts']} prompts as the merge stage verifies "
          f"(<= {res['verify_max_new_tokens']} tokens, EOS allowed; its threshold {res['verify_min_match']:.0%}), "
          f"{res['match_rate_forced']:.0%} of the timed, forced-length outputs")
    print(f"  the adapter changes the base's output on {res['adapter_changed_rate']:.0%} of the verification prompts")
    for m in res["mismatches"][:2]:
        print(f"  mismatch on {m['prompt']!r}:\n    unmerged {m['unmerged'][:100]!r}\n"
              f"    merged   {m['merged'][:100]!r}")
    print(f"  max |logit diff| merged vs unmerged {res['max_logit_diff_merged_vs_unmerged']:.4g}  "
          f"(the adapter itself, unmerged vs base: {res['max_logit_diff_unmerged_vs_base']:.4g})")
    print()
    print(f"== 4-bit layers: {dq['layers']} Linear4bit, {dq['params']:,} parameters")
    for label, r, theory in (("NF4 + double quant (defaults)", dq, THEORY_DQ), ("NF4, single quant", sq, THEORY_SQ)):
        print(f"  {label:<{w}} {r['per_param']:.4f} bytes/param  (without the per-layer lookup tables "
              f"{r['payload_per_param']:.4f}; theory {theory:.4f}; layers {r['layer_min']:.4f}..{r['layer_max']:.4f})")
        print(f"  {'':<{w}} packed {_mb(r['packed'])}, absmax {_mb(r['absmax'])}, nested absmax+offset "
              f"{_mb(r['nested'])}, lookup tables {_mb(r['tables'])}")
    print(f"  ratio double / single quant: {res['double_over_single']:.4f}")
    print()
    print("== footprint")
    print(f"  {'safetensors on disk: base':<{w}} {_mb(g['disk']['base']):>12}  {g['params']['base']:,} params")
    print(f"  {f'safetensors on disk: merged ({merge_dtype})':<{w}} {_mb(g['disk']['merged']):>12}  "
          f"{g['params']['merged']:,} params")
    print(f"  ratio merged / base on disk: {res['disk_ratio']:.4f}   parameter counts equal: {res['params_equal']}")
    print(f"  {f'in memory: unquantized base ({store_dtype})':<{w}} {_mb(memory_16):>12}")
    print(f"  {f'in memory: 4-bit base (rest in {store_dtype})':<{w}} {_mb(q['memory_4bit']):>12}")
    if q["memory_4bit_here"] != q["memory_4bit"]:
        label = f"in memory: 4-bit base (rest in {q['compute_here']}, here)"
        print(f"  {label:<{w}} {_mb(q['memory_4bit_here']):>12}")
    print(f"  ratio 4-bit / unquantized in memory: {res['memory_ratio']:.3f}")
    print(f"\ntotal {res['seconds']:.0f} s")
    return res


if __name__ == "__main__":
    main()
