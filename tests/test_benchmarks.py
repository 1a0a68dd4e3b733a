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
    out = _load("prepare_throughput").main(["--rows", "400", "--base", str(tiny_model_dir), "--cpus", "2"])
    assert out["rows"] == 400 and out["counts"]["quarantine"] == 0
    assert out["ratio"] > 0 and "ratio prepare / baseline" in capsys.readouterr().out


def test_packing_efficiency_smoke(tiny_model_dir: Path) -> None:
    out = _load("packing_efficiency").main(["--base", str(tiny_model_dir), "--n", "2000"])
    assert out["sample (capacity 2048)"]["packing"] >= 0.95
    tail = out["long-tailed (capacity 2048)"]
    assert tail["packing"] >= 0.95 > tail["padding"]


def test_prepare_memory_smoke(tiny_model_dir: Path) -> None:
    out = _load("prepare_memory").main(["--rows", "100", "--base", str(tiny_model_dir)])
    assert set(out["peaks"]) == {100, 1000}
    assert all(p["driver"] > 50 and p["worker"] > 0 for p in out["peaks"].values())


def test_train_throughput_smoke(capsys) -> None:  # noqa: ANN001
    out = _load("train_throughput").main(["--smoke"])
    today, new = out["today"], out["defaults"]
    assert today["tokens_per_s"] > 0 and new["tokens_per_s"] > 0
    assert (today["checkpointing"], today["micro_batch"]) == (True, 8)
    assert (new["checkpointing"], new["liger"]) == (False, False)  # what the planner picks on a CPU
    assert "ratio defaults / today" in capsys.readouterr().out


def test_tune_overhead_smoke(tiny_model_dir: Path, capsys) -> None:  # noqa: ANN001
    out = _load("tune_overhead").main(["--base", str(tiny_model_dir), "--steps", "4"])
    assert out["bare_s"] > 0 and out["tune_s"] > 0 and "ratio" in capsys.readouterr().out


def test_asha_vs_grid_smoke(tiny_model_dir: Path, capsys) -> None:  # noqa: ANN001
    out = _load("asha_vs_grid").main(["--base", str(tiny_model_dir), "--smoke"])
    assert out["grid"]["trials"] == out["asha"]["trials"] == 2
    assert out["asha"]["trial_steps"] <= out["grid"]["trial_steps"] == 2 * 8  # ASHA never trains more
    assert "ASHA / grid" in capsys.readouterr().out


def test_eval_throughput_smoke(tiny_model_dir: Path, capsys) -> None:  # noqa: ANN001
    out = _load("eval_throughput").main(["--base", str(tiny_model_dir), "--rows", "8", "--batch-size", "2",
                                         "--new-tokens", "4"])
    assert out["rows"] == 8 and out["one"]["rows_per_s"] > 0 and out["two"]["rows_per_s"] > 0
    assert (out["one"]["actors_used"], out["two"]["actors_used"]) == (1, 2)  # both actors got work
    assert out["same_answers"] == 1.0  # more actors change how fast, never what is generated
    assert "ratio 2 actors / 1 actor" in capsys.readouterr().out


def test_serve_load_smoke(tiny_model_dir: Path, capsys) -> None:  # noqa: ANN001
    out = _load("serve_load").main(["--base", str(tiny_model_dir), "--requests", "8", "--concurrency", "4",
                                    "--tokens", "4", "--threads", "1"])
    assert out["errors"] == 0 and out["many"]["requests"] == 8
    assert out["overhead"] > 0 and out["batching"] > 0 and out["one"]["p95_s"] >= out["one"]["p50_s"]
    text = capsys.readouterr().out
    assert "serve overhead" in text and "batching (tokens/s at concurrency 4 / 1)" in text
