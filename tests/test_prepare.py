"""The prepare stage on a local Ray: every file type and format in, every row accounted for.

One module-scoped prepare over a folder holding each file type (JSONL, JSON
array, Parquet, gzip and zstd JSONL, a corrupt .gz, an unsupported file) and
each row format, with one row per quarantine reason and duplicates of both
kinds; the tests read its outputs and manifest. A tiny data.split_bytes has
the JSONL and Parquet files read in parts, so the line numbers, per-file
counts and first occurrences checked below hold across parts too.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ray_qlora.config import parse_config
from ray_qlora.errors import DataError
from ray_qlora.prepare import assign_split, content_hash, prepare, repeats_for
from ray_qlora.storage import RunPaths

LONG = " ".join(f"word{i}" for i in range(100))  # 100 words: one changed word keeps Jaccard ~0.93


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


def test_mixing_repeats_average_to_the_weight() -> None:
    hashes = [content_hash([{"role": "user", "content": str(i)}]) for i in range(4000)]
    assert all(repeats_for(2.0, h, 1) == 2 for h in hashes[:50])
    half = sum(repeats_for(0.5, h, 1) for h in hashes) / len(hashes)
    assert 0.46 < half < 0.54
    assert 1.7 < sum(repeats_for(1.75, h, 1) for h in hashes) / len(hashes) < 1.8


def test_row_actor_processes_a_whole_file_block_in_slices(tokenizer_dir: Path, tmp_path: Path) -> None:
    """Ray Data hands an actor a whole file as one block; it must come back in data.batch_size slices, in order."""
    from ray_qlora.modeling import load_tokenizer
    from ray_qlora.prepare import _RowProcessor

    cfg = parse_config({"run": {"output_uri": str(tmp_path)}, "data": {"input_uris": ["x"], "batch_size": 3}})
    raws = [json.dumps(_alpaca(i)) for i in range(6)] + ["{not json", ""]
    n = len(raws)
    block = pa.table({"uid": [f"u{i}" for i in range(n)], "path": ["f.jsonl"] * n, "source": pa.array([0] * n, pa.int32()),
                      "line": list(range(1, n + 1)), "record": ["row"] * (n - 1) + ["file"], "raw": raws,
                      "reason": [""] * n})
    out = list(_RowProcessor(cfg.model_dump_json(), load_tokenizer(tokenizer_dir))(block))
    assert [t.num_rows for t in out] == [3, 3, 2]
    rows = pa.concat_tables(out).to_pylist()
    assert [r["uid"] for r in rows] == [f"u{i}" for i in range(n)]
    assert [r["status"] for r in rows] == ["ok"] * 6 + ["quarantine", "file"]
    assert rows[6]["reason"].startswith("invalid JSON") and all(r["num_label_tokens"] > 0 for r in rows[:6])


def _alpaca(i: int) -> dict[str, str]:
    return {"instruction": f"Echo {i}", "output": f"echo {i}"}


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def _tool_row(city: str) -> dict[str, Any]:
    return {"tools": [WEATHER], "messages": [
        {"role": "user", "content": f"Weather in {city}?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12 C"},
        {"role": "assistant", "content": f"12 C in {city}."}]}


def _write_inputs(folder: Path) -> dict[str, int]:
    """One folder with every file type, format and failure; returns the rows expected per file."""
    folder.mkdir(parents=True)
    expected: dict[str, int] = {}
    good = [json.dumps(_alpaca(i)) for i in range(30)]
    a_lines = good + [
        '{"instruction": "cut off"',                               # invalid JSON
        json.dumps({"instruction": "no output"}),                  # missing field
        json.dumps({"foo": "bar"}),                                # unrecognised format
        json.dumps({"text": "raw text for pre-training"}),         # plain text, not allowed here
        json.dumps(_alpaca(0)),                                    # exact duplicate
        json.dumps({"instruction": "ECHO   0", "output": "Echo 0"}),  # duplicate after case/space folding
        json.dumps({"instruction": LONG, "output": "long answer"}),
        json.dumps({"instruction": LONG.replace("word50", "other"), "output": "long answer"}),  # near-dup
        json.dumps({"instruction": "x " * 800, "output": "too long for max_seq_length"}),
    ]
    raw = "\n".join(a_lines).encode() + b'\n{"instruction": "bad \xff byte", "output": "y"}\n\n'
    (folder / "a.jsonl").write_bytes(raw)
    expected["a.jsonl"] = len(a_lines) + 1  # the blank line is not a row

    rows: list[dict[str, Any]] = [
        {"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]}
        for i in range(10)]
    rows.append({"messages": [{"role": "user", "content": "unanswered"}]})
    pq.write_table(pa.Table.from_pylist(rows), folder / "b.parquet", row_group_size=4)  # 3 groups, 2 parts
    expected["b.parquet"] = len(rows)
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "parts"},
                                                       {"type": "text", "text": " joined"}]},
                          {"role": "assistant", "content": "ok"}]}
    (folder / "b_parts.ndjson").write_text(json.dumps(parts) + "\n")
    expected["b_parts.ndjson"] = 1

    share = [{"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": f"H{i}"},
                                {"from": "gpt", "value": f"G{i}"}]} for i in range(10)]
    (folder / "c.jsonl.gz").write_bytes(gzip.compress("\n".join(map(json.dumps, share)).encode()))
    expected["c.jsonl.gz"] = len(share)

    array = [{"instruction": f"Array {i}", "input": "ctx", "output": f"out {i}"} for i in range(8)]
    (folder / "d.json").write_text(json.dumps(array, indent=2))
    expected["d.json"] = len(array)

    pc_rows = [json.dumps({"prompt": f"P{i}?", "completion": f"C{i}"}) for i in range(6)]
    with pa.CompressedOutputStream(str(folder / "e.jsonl.zst"), "zstd") as out:
        out.write("\n".join(pc_rows).encode())
    expected["e.jsonl.zst"] = len(pc_rows)

    tools = [_tool_row(city) for city in ("Oslo", "Lima", "Pune", "Kyiv", "Perth")]
    tools.append({"tools": json.dumps([WEATHER["function"]]), "conversations": [  # LLaMA-Factory's ShareGPT
        {"from": "human", "value": "Weather in Quito?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Quito"}})}]})
    bad = _tool_row("Rome")
    bad["messages"][1]["tool_calls"][0]["function"]["name"] = "get_time"
    tools.append(bad)  # calls a function its tools do not define
    (folder / "g_tools.jsonl").write_text("\n".join(map(json.dumps, tools)) + "\n")
    expected["g_tools.jsonl"] = len(tools)

    whole = gzip.compress("\n".join(json.dumps(_alpaca(100 + i)) for i in range(5000)).encode())
    (folder / "f.jsonl.gz").write_bytes(whole[: len(whole) // 2])  # truncated download
    (folder / "notes.csv").write_text("not,instruction,data\n")
    (folder / "gone.jsonl").symlink_to(folder / "deleted-since.jsonl")  # a dangling link
    return expected


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, ray_local: None):  # noqa: ANN201
    root = tmp_path_factory.mktemp("prep")
    expected = _write_inputs(root / "raw")
    cfg = parse_config({"run": {"output_uri": str(root / "out"), "seed": 3},
                        "data": {"input_uris": [str(root / "raw")], "eval_fraction": 0.25, "max_seq_length": 512,
                                 "split_bytes": 300},
                        "model": {"base": str(tiny_model_dir)}})
    run = RunPaths.for_run(cfg.run.output_uri, "p1")
    return cfg, run, expected, prepare(cfg, run)


def _files(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {Path(f["uri"]).name: f for f in manifest["files"]}


def test_every_file_is_read_or_listed_with_a_reason(prepared) -> None:  # noqa: ANN001
    _, _, expected, manifest = prepared
    files = _files(manifest)
    for name, n in expected.items():
        assert files[name]["status"] == "read" and files[name]["read"] == n, name
    assert files["a.jsonl"]["parts"] > 5 and files["b.parquet"]["parts"] == 2, "large files are read in parts"
    assert files["d.json"]["parts"] == 1, "a JSON array is read whole"
    assert files["f.jsonl.gz"]["parts"] > 5, "a compressed file is read in stripes"
    assert files["f.jsonl.gz"]["status"] == "error"
    assert files["f.jsonl.gz"]["reason"].startswith("corrupt:")
    assert files["f.jsonl.gz"]["reason"].count("corrupt:") == 1, "its stripes' identical reports said once"
    assert files["notes.csv"]["status"] == "skipped" and "unsupported file type" in files["notes.csv"]["reason"]
    assert files["gone.jsonl"] == {**files["gone.jsonl"], "status": "skipped",
                                   "reason": "unreadable: broken symbolic link"}


def test_every_row_is_accounted_for_per_file_and_in_total(prepared) -> None:  # noqa: ANN001
    _, _, expected, manifest = prepared
    c = manifest["counts"]
    assert c["read"] == sum(expected.values()) + _files(manifest)["f.jsonl.gz"]["read"]
    assert c["read"] == c["train"] + c["eval"] + c["quarantine"] + c["duplicate"]
    for f in manifest["files"]:
        if f["status"] != "skipped":
            assert f["read"] == f["train"] + f["eval"] + f["quarantine"] + f["duplicate"], f["uri"]
    assert c["duplicate"] == 3 and c["quarantine"] == 8


def test_quarantine_keeps_row_and_reason(prepared) -> None:  # noqa: ANN001
    _, run, _, manifest = prepared
    q = pq.read_table(run.quarantine).to_pylist()
    by_reason = {r["reason"].split(":")[0]: r for r in q}
    assert set(manifest["quarantine_reasons"]) == {
        "invalid JSON", "field 'output' is missing or empty", "unrecognised row format",
        "plain-text row (continued pre-training); set data.allow_text", "too long", "not UTF-8",
        "the conversation must end with an assistant message",
        "a tool call names 'get_time', which the row's tools do not define (['get_weather'])"}
    assert by_reason["invalid JSON"]["raw"] == '{"instruction": "cut off"'
    assert by_reason["invalid JSON"]["path"].endswith("a.jsonl") and by_reason["invalid JSON"]["line"] == 31
    assert "\\xff" in by_reason["not UTF-8"]["raw"], "the bad bytes are kept, escaped"
    assert sum(manifest["quarantine_reasons"].values()) == len(q)


def test_duplicates_exact_and_near_point_at_the_kept_row(prepared) -> None:  # noqa: ANN001
    _, run, _, manifest = prepared
    dups = pq.read_table(Path(manifest["uris"]["duplicates"])).to_pylist()
    kinds = sorted(d["reason"].split(" of ")[0].split(" (")[0] for d in dups)
    assert kinds == ["exact duplicate", "exact duplicate", "near-duplicate"]
    assert manifest["duplicate_kinds"] == {"exact duplicate": 2, "near-duplicate": 1}
    near = next(d for d in dups if d["reason"].startswith("near"))
    assert "other" in near["raw"] and near["kept_uid"] < near["uid"], "the first occurrence is kept"
    kept = [json.loads(r["messages"]) for r in pq.read_table(run.train).to_pylist()
            + pq.read_table(run.eval).to_pylist()]
    assert sum(LONG in m[0]["content"] for m in kept) == 1


def test_every_format_reaches_the_shards(prepared) -> None:  # noqa: ANN001
    _, run, _, _ = prepared
    rows = pq.read_table(run.train).to_pylist() + pq.read_table(run.eval).to_pylist()
    users = {json.loads(r["messages"])[-2]["content"] for r in rows}
    assert {"H3", "Q3", "P3?", "Array 3\n\nctx", "parts joined", "Echo 3"} <= users
    share = next(json.loads(r["messages"]) for r in rows if json.loads(r["messages"])[-1]["content"] == "G1")
    assert share[0] == {"role": "system", "content": "be brief"}


def test_tool_use_reaches_the_shards_with_its_tools_and_calls_labelled(prepared) -> None:  # noqa: ANN001
    from ray_qlora.modeling import load_tokenizer

    cfg, run, _, _ = prepared
    tok = load_tokenizer(cfg.model.base)
    rows = pq.read_table(run.train).to_pylist() + pq.read_table(run.eval).to_pylist()
    tooled = [r for r in rows if r["tools"]]
    assert len(tooled) == 6 and all(json.loads(r["tools"]) == [WEATHER] for r in tooled)
    assert all(not r["tools"] for r in rows if r not in tooled)
    for r in tooled:
        msgs = json.loads(r["messages"])
        city = msgs[1]["tool_calls"][0]["function"]["arguments"]["city"]
        learned = tok.decode([t for t, lab in zip(r["input_ids"], r["labels"]) if lab != -100])
        assert f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}\n</tool_call>' in learned
        assert "<tools>" in tok.decode(r["input_ids"]) and "<tools>" not in learned  # shown, not learned


def test_shards_hold_masked_tokens_and_checks_pass(prepared) -> None:  # noqa: ANN001
    _, run, _, manifest = prepared
    train = pq.read_table(run.train).to_pylist()
    for row in train:
        assert len(row["input_ids"]) == len(row["labels"]) == row["num_tokens"]
        assert 0 < row["num_label_tokens"] < row["num_tokens"]
    hashes = [r["content_hash"] for r in train] + [r["content_hash"] for r in pq.read_table(run.eval).to_pylist()]
    assert len(hashes) == len(set(hashes)), "no conversation appears twice across the splits"
    stats = manifest["token_lengths"]["train"]
    assert stats["min"] <= stats["p50"] <= stats["p95"] <= stats["max"] <= 512
    assert manifest["checks"]["end_of_turn_token"] == "<|im_end|>"
    assert manifest["checks"]["tool_use"] == "hermes tags (tool front)"  # SmolLM2's template writes no tool use
    assert all(v["passed"] for k, v in manifest["checks"].items() if isinstance(v, dict))
    assert len(manifest["input_hash"]) == 64 and manifest["cache_hit"] is False


def test_rerun_reuses_the_earlier_output(prepared) -> None:  # noqa: ANN001
    cfg, run, _, manifest = prepared
    other = RunPaths.for_run(cfg.run.output_uri, "p2")
    again = prepare(cfg, other)
    assert again["cache_hit"] is True and again["cached_from"] == run.root
    assert again["counts"] == manifest["counts"]
    a = sorted(r["content_hash"] for r in pq.read_table(run.eval).to_pylist())
    assert a == sorted(r["content_hash"] for r in pq.read_table(other.eval).to_pylist())
    changed = prepare(cfg.with_overrides({"data.eval_fraction": 0.3}), RunPaths.for_run(cfg.run.output_uri, "p3"))
    assert changed["cache_hit"] is False and changed["fingerprint"] != manifest["fingerprint"]


def _cfg(tmp: Path, model: Path, **data: Any):  # noqa: ANN202
    return parse_config({"run": {"output_uri": str(tmp / "out")},
                         "data": {"input_uris": [str(tmp / "raw")], "max_seq_length": 96, **data},
                         "model": {"base": str(model)}})


def test_clean_data_with_weights_and_packing(tmp_path: Path, tiny_model_dir: Path, ray_local: None) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.jsonl").write_text("\n".join(json.dumps(_alpaca(i)) for i in range(60)))
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "b.jsonl").write_text(
        "\n".join(json.dumps({"prompt": f"Say {i}", "completion": f"{i}"}) for i in range(40)))
    cfg = _cfg(tmp_path, tiny_model_dir, packing=True,
               sources=[{"uri": str(tmp_path / "more" / "*.jsonl"), "weight": 2.0}])
    run = RunPaths.for_run(cfg.run.output_uri, "clean")
    from ray.data import DataContext

    strategy = DataContext.get_current().shuffle_strategy
    m = prepare(cfg, run)  # no bad rows, no duplicates: an empty quarantine is not an error
    assert DataContext.get_current().shuffle_strategy == strategy, "prepare's shuffle choice stays in the stage"
    assert m["counts"]["quarantine"] == 0 and m["counts"]["duplicate"] == 0 and m["quarantine_reasons"] == {}
    mix = {Path(x["source"]).name: x for x in m["mixing"]}
    assert mix["*.jsonl"]["train_uses"] == 2 * mix["*.jsonl"]["train_examples"]
    assert mix["raw"]["train_uses"] == mix["raw"]["train_examples"]
    packed = pq.read_table(run.train).to_pylist()
    assert sum(r["num_examples"] for r in packed) == sum(x["train_uses"] for x in m["mixing"])
    assert all(sum(r["seq_lengths"]) == r["num_tokens"] <= 96 for r in packed)
    assert m["train_rows"]["packed"] and m["train_rows"]["efficiency"] > 0.8


def test_a_failing_template_check_stops_the_stage(tmp_path: Path, tiny_model_dir: Path, ray_local: None) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.jsonl").write_text("\n".join(json.dumps(_alpaca(i)) for i in range(10)))
    # answers end with nothing: no end-of-turn token to label
    template = ("{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:\n{% endif %}")
    with pytest.raises(DataError, match=r"end_of_turn_labelled.*a.jsonl line \d"):
        prepare(_cfg(tmp_path, tiny_model_dir, chat_template=template), RunPaths.for_run(str(tmp_path), "t"))


def test_auto_split_gives_each_cpu_two_parts_within_bounds(tmp_path: Path, ray_local: None) -> None:
    from ray_qlora.data.sources import InputFile
    from ray_qlora.prepare import _split_bytes

    def files(*mib: float) -> list[InputFile]:
        return [InputFile(i, f"f{i}.jsonl", 0, "jsonl", None, int(m * (1 << 20)), "") for i, m in enumerate(mib)]

    cfg = parse_config({"run": {"output_uri": str(tmp_path)}, "data": {"input_uris": ["x"]}})
    assert _split_bytes(cfg, files(64, 16)) == 10 << 20, "80 MiB over 2 parts for each of ray_local's 4 CPUs"
    assert _split_bytes(cfg, files(0.5)) == 1 << 20, "small inputs: parts of at least 1 MiB"
    assert _split_bytes(cfg, files(4096)) == 64 << 20, "huge inputs: parts of at most 64 MiB"
    assert _split_bytes(cfg.with_overrides({"data.split_bytes": 0}), files(4096)) == 0


def test_missing_input_is_a_clear_error(tmp_path: Path, tiny_model_dir: Path, ray_local: None) -> None:
    cfg = parse_config({"run": {"output_uri": str(tmp_path)}, "data": {"input_uris": [str(tmp_path / "none")]},
                        "model": {"base": str(tiny_model_dir)}})
    with pytest.raises(DataError, match="nothing at"):
        prepare(cfg, RunPaths.for_run(str(tmp_path), "x"))


def test_cli_prints_a_clean_error_when_nothing_is_usable(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A user's data mistake: one line on stderr, exit 2, no traceback (a real CLI process, its own Ray)."""
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.jsonl").write_text('{"foo": 1}\n{"bar": 2}\nnot json\n')
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump({"run": {"output_uri": str(tmp_path / "out")}, "ray": {"num_cpus": 2},
                                    "data": {"input_uris": [str(tmp_path / "raw")]},
                                    "model": {"base": str(tiny_model_dir)}}))
    proc = subprocess.run([sys.executable, "-m", "ray_qlora.cli", "prepare", str(conf), "--run-id", "r"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "error: prepare: 0 train / 0 eval examples from 3 rows (3 quarantined" in proc.stderr
    # nothing lost: the quarantine the message points at holds every row with its reason
    rejected = pq.read_table(RunPaths.for_run(str(tmp_path / "out"), "r").quarantine).to_pylist()
    assert sorted(r["line"] for r in rejected) == [1, 2, 3] and all(r["reason"] for r in rejected)


def test_prepare_again_into_the_same_run_replaces_its_shards(tmp_path: Path, tiny_model_dir: Path,
                                                             ray_local: None) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.jsonl").write_text("\n".join(json.dumps(_alpaca(i)) for i in range(40)))
    run = RunPaths.for_run(str(tmp_path / "out"), "same")
    first = prepare(_cfg(tmp_path, tiny_model_dir, eval_fraction=0.2), run)
    second = prepare(_cfg(tmp_path, tiny_model_dir, eval_fraction=0.5), run)
    assert second["cache_hit"] is False and second["counts"] != first["counts"]
    assert pq.read_table(run.train).num_rows == second["counts"]["train"]
    assert pq.read_table(run.eval).num_rows == second["counts"]["eval"]


def test_local_and_s3_sources_mix(tmp_path: Path, tiny_model_dir: Path, local_s3, ray_local: None) -> None:  # noqa: ANN001
    """Each file is read through its own filesystem: a local folder and an S3 prefix in one config,
    each file in parts (ranged reads of the S3 object)."""
    from ray_qlora import storage
    from ray_qlora.config import StorageConfig

    local_s3.create_bucket("mix-bucket")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.jsonl").write_text("\n".join(json.dumps(_alpaca(i)) for i in range(20)))
    remote = "\n".join(json.dumps({"prompt": f"S3 {i}", "completion": "ok"}) for i in range(20))
    storage.write_bytes("s3://mix-bucket/raw/b.jsonl", remote.encode(), StorageConfig())
    cfg = _cfg(tmp_path, tiny_model_dir, sources=[{"uri": "s3://mix-bucket/raw/"}], split_bytes=200)
    m = prepare(cfg, RunPaths.for_run(cfg.run.output_uri, "mix"))
    assert {f["uri"]: f["read"] for f in m["files"]} == {str(tmp_path / "raw" / "a.jsonl"): 20,
                                                        "s3://mix-bucket/raw/b.jsonl": 20}
    assert all(f["parts"] > 2 for f in m["files"])
    assert m["counts"]["train"] + m["counts"]["eval"] == 40
