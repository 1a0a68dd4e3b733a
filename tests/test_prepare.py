"""The prepare stage on a local Ray: split determinism, dedup, quarantine with reasons."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ray_qlora.config import parse_config
from ray_qlora.prepare import assign_split, content_hash, prepare
from ray_qlora.storage import RunPaths


def test_split_is_deterministic_and_seeded() -> None:
    hashes = [content_hash([{"role": "user", "content": str(i)}]) for i in range(2000)]
    a = [assign_split(h, 1, 0.2) for h in hashes]
    assert a == [assign_split(h, 1, 0.2) for h in hashes]
    assert a != [assign_split(h, 2, 0.2) for h in hashes]
    share = a.count("eval") / len(a)
    assert 0.16 < share < 0.24


def test_split_does_not_depend_on_order() -> None:
    hashes = [content_hash([{"role": "user", "content": str(i)}]) for i in range(100)]
    forward = {h: assign_split(h, 7, 0.3) for h in hashes}
    backward = {h: assign_split(h, 7, 0.3) for h in reversed(hashes)}
    assert forward == backward


def _write_inputs(folder: Path) -> int:
    """Good rows in both formats, plus malformed ones; returns the number of lines/rows."""
    import pyarrow as pa

    folder.mkdir(parents=True)
    good = [json.dumps({"instruction": f"Echo {i}", "output": f"echo {i}"}) for i in range(30)]
    bad = ['{"instruction": "cut off"', json.dumps({"instruction": "no output"}),
           json.dumps({"foo": "bar"}), good[0]]  # the last is an exact duplicate
    (folder / "a.jsonl").write_text("\n".join(good + bad) + "\n\n")  # blank lines are not rows
    rows = [{"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]}
            for i in range(10)]
    rows.append({"messages": [{"role": "user", "content": "unanswered"}]})
    pq.write_table(pa.Table.from_pylist(rows), folder / "b.parquet")
    return len(good) + len(bad) + len(rows)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, ray_local: None):  # noqa: ANN201
    root = tmp_path_factory.mktemp("prep")
    n_rows = _write_inputs(root / "raw")
    cfg = parse_config({"run": {"output_uri": str(root / "out"), "seed": 3},
                        "data": {"input_uris": [str(root / "raw")], "eval_fraction": 0.25, "max_seq_length": 64},
                        "model": {"base": str(tiny_model_dir)}})
    run = RunPaths.for_run(cfg.run.output_uri, "p1")
    return cfg, run, n_rows, prepare(cfg, run)


def test_every_row_is_accounted_for(prepared) -> None:  # noqa: ANN001
    _, _, n_rows, manifest = prepared
    c = manifest["counts"]
    assert c["read"] == n_rows
    assert c["train"] + c["eval"] + c["quarantine"] == c["read"]
    assert c["quarantine"] == 5 and c["train"] > 0 and c["eval"] > 0


def test_quarantine_keeps_row_and_reason(prepared) -> None:  # noqa: ANN001
    _, run, _, manifest = prepared
    q = pq.read_table(run.quarantine).to_pylist()
    reasons = sorted(r["reason"].split(":")[0] for r in q)
    assert any(r.startswith("invalid JSON") for r in reasons)
    assert "field 'output' is missing or empty" in reasons
    assert any(r.startswith("duplicate of a conversation") for r in reasons)
    assert any(r.startswith("unrecognised row format") for r in reasons)
    assert "the conversation must end with an assistant message" in reasons
    cut = next(r for r in q if r["reason"].startswith("invalid JSON"))
    assert cut["raw"] == '{"instruction": "cut off"' and cut["path"].endswith("a.jsonl")
    assert sum(manifest["quarantine_reasons"].values()) == len(q)


def test_shards_hold_masked_tokens_and_manifest_stats(prepared) -> None:  # noqa: ANN001
    _, run, _, manifest = prepared
    train = pq.read_table(run.train).to_pylist()
    for row in train:
        assert len(row["input_ids"]) == len(row["labels"]) == row["num_tokens"]
        assert 0 < row["num_label_tokens"] < row["num_tokens"]
    hashes = [r["content_hash"] for r in train] + [r["content_hash"] for r in pq.read_table(run.eval).to_pylist()]
    assert len(hashes) == len(set(hashes)), "no conversation appears twice across the splits"
    stats = manifest["token_lengths"]["train"]
    assert stats["min"] <= stats["p50"] <= stats["max"]
    assert len(manifest["input_hash"]) == 64


def test_rerun_gives_the_same_split(prepared) -> None:  # noqa: ANN001
    cfg, run, _, manifest = prepared
    again = prepare(cfg, RunPaths.for_run(cfg.run.output_uri, "p2"))
    assert again["counts"] == manifest["counts"]
    a = sorted(r["content_hash"] for r in pq.read_table(run.eval).to_pylist())
    b = sorted(r["content_hash"] for r in pq.read_table(RunPaths.for_run(cfg.run.output_uri, "p2").eval).to_pylist())
    assert a == b


def test_missing_input_is_a_clear_error(tmp_path: Path, tiny_model_dir: Path, ray_local: None) -> None:
    cfg = parse_config({"run": {"output_uri": str(tmp_path)}, "data": {"input_uris": [str(tmp_path / "none")]},
                        "model": {"base": str(tiny_model_dir)}})
    with pytest.raises(FileNotFoundError, match="nothing at"):
        prepare(cfg, RunPaths.for_run(str(tmp_path), "x"))
