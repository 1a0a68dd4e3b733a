"""The benchmarks run in smoke mode (tiny sizes, the tiny model's tokenizer) and print sane figures.

The figures themselves are measured by running the scripts at full size
(see README); here only that they run end to end and compute what they claim.
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


def test_prepare_throughput_smoke(tiny_model_dir: Path, capsys) -> None:  # noqa: ANN001
    out = _load("prepare_throughput").main(["--rows", "400", "--base", str(tiny_model_dir), "--cpus", "2",
                                            "--one-file", "--split-bytes", "20000"])
    assert out["rows"] == 400 and out["counts"]["quarantine"] == 0
    assert out["parts"] > 1 and out["whole_counts"] == out["counts"], "parts place every row as the whole file does"
    printed = capsys.readouterr().out
    assert out["ratio"] > 0 and "ratio prepare / baseline" in printed and "ratio parts / whole" in printed


def test_packing_efficiency_smoke(tiny_model_dir: Path) -> None:
    out = _load("packing_efficiency").main(["--base", str(tiny_model_dir), "--n", "2000"])
    assert out["sample (capacity 2048)"]["packing"] >= 0.95
    tail = out["long-tailed (capacity 2048)"]
    assert tail["packing"] >= 0.95 > tail["padding"]


def test_prepare_memory_smoke(tiny_model_dir: Path) -> None:
    out = _load("prepare_memory").main(["--rows", "100", "--base", str(tiny_model_dir)])
    assert set(out["peaks"]) == {100, 1000}
    # the row actors are measured (a worker renames itself to what it runs; matching the command line alone missed them)
    assert all(p["driver"] > 50 and p["worker"] >= p["row_actor"] > 0 for p in out["peaks"].values())


def test_train_throughput_smoke(capsys) -> None:  # noqa: ANN001
    out = _load("train_throughput").main(["--smoke"])
    today, new = out["today"], out["defaults"]
    assert today["tokens_per_s"] > 0 and new["tokens_per_s"] > 0
    assert (today["checkpointing"], today["micro_batch"]) == (True, 8)
    assert (new["checkpointing"], new["liger"]) == (False, False)  # what the planner picks on a CPU
    assert "ratio defaults / today" in capsys.readouterr().out


def test_tune_overhead_smoke(tiny_model_dir: Path, capsys) -> None:  # noqa: ANN001
    out = _load("tune_overhead").main(["--base", str(tiny_model_dir), "--steps", "4"])
    assert out["bare_s"] > 0 and out["tune_s"] > 0 and out["borrow_s"] > 0
    assert (out["threads"], out["borrow_threads"]) == (1, 2)  # alone on a 2-CPU Ray: borrowing took the other
    printed = capsys.readouterr().out
    assert "ratio" in printed and "borrowing the idle CPU" in printed


def test_asha_vs_grid_smoke(tiny_model_dir: Path, capsys) -> None:  # noqa: ANN001
    out = _load("asha_vs_grid").main(["--base", str(tiny_model_dir), "--smoke"])
    assert out["grid"]["trials"] == out["asha"]["trials"] == 2
    assert out["asha"]["trial_steps"] <= out["grid"]["trial_steps"] == 2 * 8  # ASHA never trains more
    # Synchronous halving keeps ceil(2/3) = 1 of the 2 at the first rung (report 1, step 1).
    assert out["sha"]["stopped_early"] == 1 and out["sha"]["trial_steps"] == 1 + 8
    printed = capsys.readouterr().out
    assert "ASHA / grid" in printed and "SHA / grid" in printed


def test_eval_throughput_smoke(tiny_model_dir: Path, capsys) -> None:  # noqa: ANN001
    out = _load("eval_throughput").main(["--base", str(tiny_model_dir), "--rows", "8", "--batch-size", "2",
                                         "--new-tokens", "4"])
    assert out["rows"] == 8 and out["one"]["rows_per_s"] > 0 and out["two"]["rows_per_s"] > 0
    assert (out["one"]["actors_used"], out["two"]["actors_used"]) == (1, 2)  # both actors got work
    assert out["same_answers"] == 1.0  # more actors change how fast, never what is generated
    assert "ratio 2 actors / 1 actor" in capsys.readouterr().out


def test_structured_output_smoke(tiny_model_dir: Path, capsys) -> None:  # noqa: ANN001
    out = _load("structured_output").main(["--base", str(tiny_model_dir), "--n", "4", "--batch-size", "2",
                                           "--new-tokens", "24"])
    assert out["free"]["schema_valid"] == 0.0  # the random model writes no orders JSON on its own
    assert out["constrained"]["first"].startswith('{"drug": "')  # held to the schema, in its key order
    assert out["ratio"] > 0 and out["compile_s"] > 0
    assert "ratio constrained / free tokens/s" in capsys.readouterr().out


def test_tool_calls_smoke(tiny_model_dir: Path, capsys) -> None:  # noqa: ANN001
    out = _load("tool_calls").main(["--base", str(tiny_model_dir), "--n", "4", "--batch-size", "2",
                                    "--new-tokens", "24"])
    sides = out["sides"]
    assert sides["prompted"]["valid_calls"] == 0.0  # the random model writes no <tool_call> on its own
    assert sides["named"]["first"].startswith('{"drug": "')  # the arguments, held to the tool's parameters
    assert sides["required"]["first"].startswith('[{"name": "place_order", "parameters":')
    assert out["ratio"] > 0 and "ratio named / prompted tokens/s" in capsys.readouterr().out


def test_logprobs_cost_smoke(tiny_model_dir: Path, capsys) -> None:  # noqa: ANN001
    out = _load("logprobs_cost").main(["--base", str(tiny_model_dir), "--n", "3", "--batch-size", "3",
                                       "--new-tokens", "8"])
    assert out["same_answers"] and out["batched_ratio"] > 0 and out["streamed_ratio"] > 0
    assert all(side["tokens"] == 3 * 8 for side in out["sides"].values())  # the random model never stops early
    assert "ratio top-20 logprobs / free tokens/s" in capsys.readouterr().out


def test_serve_load_smoke(tiny_model_dir: Path, capsys) -> None:  # noqa: ANN001
    out = _load("serve_load").main(["--base", str(tiny_model_dir), "--requests", "8", "--concurrency", "4",
                                    "--tokens", "4", "--threads", "1", "--engine", "transformers"])
    assert out["errors"] == 0 and out["many"]["requests"] == 8
    assert out["overhead"] > 0 and out["batching"] > 0 and out["one"]["p95_s"] >= out["one"]["p50_s"]
    text = capsys.readouterr().out
    assert "serve overhead" in text and "batching (tokens/s at concurrency 4 / 1)" in text


def test_merge_footprint_smoke(tiny_model_dir: Path, capsys) -> None:  # noqa: ANN001
    """The tiny model's layers are 64 wide, so each layer's fixed lookup tables outweigh its 4-bit codes:
    bytes per parameter are bounded on what scales with the parameters (read the full figure on 135M)."""
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


def test_adapters_served_smoke(tiny_model_dir: Path, capsys) -> None:  # noqa: ANN001
    out = _load("adapters_served").main(["--base", str(tiny_model_dir), "--counts", "1", "3", "--tokens", "2",
                                         "--repeats", "1"])
    one, three = out["rows"]
    assert (one["adapters"], three["adapters"]) == (1, 3) and one["base_bytes"] == three["base_bytes"]
    assert three["total_bytes"] == three["predicted_bytes"] == one["base_bytes"] + 3 * out["per_adapter_bytes"]
    assert out["per_adapter_bytes"] > 0 and "memory is base + N x adapter (exactly)" in capsys.readouterr().out


def test_model_download_smoke(capsys) -> None:  # noqa: ANN001
    import os

    before = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    out = _load("model_download").main(["--mib", "4", "--repeats", "1"])  # it checks the bytes of every copy
    assert {k: v for k, v in os.environ.items() if k.startswith("AWS_")} == before, \
        "its own S3 server, once stopped, must not stay this process's endpoint"
    assert len(out["seconds"]) == 2 and all(s > 0 for s in out["seconds"].values())
    assert out["ratio"] > 0 and "ratio copy_dir_from / default" in capsys.readouterr().out
