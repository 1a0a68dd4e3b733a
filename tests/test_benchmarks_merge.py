"""benchmarks/merge_footprint.py in smoke mode on the tiny model: it runs end to end and its figures hold.

The tiny model's layers are 64 wide, so each layer's fixed lookup tables (NF4's 16 values, and the
256-value 8-bit map of double quantization) weigh more than the 4-bit codes they serve; the
bytes-per-parameter bounds are therefore checked on what scales with the parameters, and the
full figure only for consistency (the 135M model is where it is meant to be read).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_merge_footprint_smoke(tiny_model_dir: Path, capsys) -> None:  # noqa: ANN001
    bench = _load("merge_footprint")
    out = bench.main(["--base", str(tiny_model_dir), "--new-tokens", "8", "--repeats", "2", "--prompts", "2"])
    printed = capsys.readouterr().out

    # 1. latency: same lengths, positive ratios, and the merged model answers like base + adapter
    assert out["equal_lengths"]
    assert all(r["median_s"] > 0 and len(r["runs_s"]) == 2 for r in out["latency"].values())
    for key in ("merged_over_base", "merged_over_unmerged", "unmerged_over_base"):
        assert out[key] > 0
    assert out["adapter"]["lora_layers"] == 14  # r=16 on all 7 linear layers of both blocks
    assert out["match_rate"] == out["match_rate_forced"] == 1.0 and out["mismatches"] == []
    assert out["verify_prompts"] == 8 and out["timed_calls"] == 2 * 2
    assert out["max_logit_diff_unmerged_vs_base"] > 0  # the adapter is a real one ...
    assert out["max_logit_diff_merged_vs_unmerged"] < 1e-3 * out["max_logit_diff_unmerged_vs_base"]  # ... merged

    # 2. 4-bit layers: what scales with the parameters is ~4.13 bits with double quant, 4.5 bits without
    dq, sq = out["quant"]["double"], out["quant"]["single"]
    assert dq["layers"] == sq["layers"] == 14 and dq["params"] == 2 * (4 * 64 * 64 + 3 * 64 * 128 - 2 * 64 * 32)
    assert 0.5 < out["payload_per_param"] < 0.56
    assert out["payload_per_param"] < out["payload_per_param_single"]
    assert abs(out["payload_per_param"] - bench.THEORY_DQ) < 0.005
    assert abs(out["payload_per_param_single"] - bench.THEORY_SQ) < 0.005
    assert dq["packed"] * 2 == dq["params"]  # two 4-bit codes per byte
    assert out["bytes_per_param"] == dq["bytes"] / dq["params"] > out["payload_per_param"]
    assert out["double_over_single"] == out["bytes_per_param"] / out["bytes_per_param_single"] > 0

    # 3. footprint: same dtype, same parameters, same bytes on disk
    assert out["merge_dtype"] == "float32" and out["params_equal"]
    assert abs(out["disk_ratio"] - 1) < 0.03
    assert 0 < out["memory_ratio"] <= 1.0

    for text in ("ratio merged / base", "ratio merged / unmerged", "ratio double / single quant",
                 "ratio merged / base on disk", "ratio 4-bit / unquantized in memory"):
        assert text in printed
