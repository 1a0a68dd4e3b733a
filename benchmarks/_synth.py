"""Synthetic instruction data in every supported format, for the prepare benchmarks.

Rows are medication-order style instructions with varied wording and random
filler, so tokenization costs what real rows cost and dedup finds nothing
it should not. Written as several files per format so Ray can read them in
parallel, like a real dataset export.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ray_qlora.data.sample import make_orders

_WORDS = ("patient ward dose review chart nurse pharmacy allergy renal hepatic weight infusion bolus taper "
          "morning evening meal stat hold resume monitor levels pressure pulse glucose pain score").split()


def _row(i: int, order: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    note = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 60)))
    question = f"{order['order']} Note {i}: {note}."
    kind = i % 4
    if kind == 0:
        return {"instruction": "Convert the order to JSON.", "input": question, "output": order["json"]}
    if kind == 1:
        return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": order["json"]}]}
    if kind == 2:
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": order["json"]}]}
    return {"prompt": question, "completion": order["json"]}


def write_dataset(folder: Path, rows: int, files_per_format: int = 4, seed: int = 0) -> list[str]:
    """``rows`` rows over 4 formats x ``files_per_format`` files; returns the raw JSON text of every row."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    orders = make_orders(rows, seed=seed)
    by_kind: dict[int, list[dict[str, Any]]] = {0: [], 1: [], 2: [], 3: []}
    for i, order in enumerate(orders):
        by_kind[i % 4].append(_row(i, order, rng))
    raws = []
    for kind, items in by_kind.items():
        for f in range(files_per_format):
            part = items[f::files_per_format]
            raws += [json.dumps(r) for r in part]
            text = "\n".join(json.dumps(r) for r in part).encode()
            if kind == 0:
                (folder / f"alpaca-{f}.jsonl").write_bytes(text)
            elif kind == 1:
                (folder / f"sharegpt-{f}.jsonl.gz").write_bytes(gzip.compress(text, compresslevel=1))
            elif kind == 2:
                pq.write_table(pa.Table.from_pylist(part), folder / f"messages-{f}.parquet")
            else:
                (folder / f"pc-{f}.json").write_text(json.dumps(part))
    return raws
