"""The sample dataset: clinical medication orders -> strict JSON.

A task where prompting a small base model fails (it chats instead of emitting
the schema) and a few minutes of QLoRA succeed, which makes the base-vs-tuned
gap visible on a laptop. Orders are generated from templates with a seeded
RNG, so the data is the same on every machine. The files mix formats on
purpose (Alpaca JSONL and chat-messages Parquet) and carry a few malformed
rows, so the demo shows quarantine at work.

The tool-use sample (``tool_sample_files``) is the same orders placed through
a ``place_order`` function instead: the assistant calls it with the order's
fields, reads the pharmacy's reply and confirms, and answers questions that
need no order in plain text, so a tuned model learns both when to call and
with what. Half of it is OpenAI messages, half LLaMA-Factory's ShareGPT
(``function_call`` and ``observation`` turns).
"""

from __future__ import annotations

import io
import json
import random
from typing import Any

__all__ = ["PLACE_ORDER", "SYSTEM_PROMPT", "TOOL_SYSTEM_PROMPT", "make_orders", "sample_files", "tool_sample_files"]

SYSTEM_PROMPT = "Convert the medication order to JSON with keys drug, dose_mg, route, frequency."

_DRUGS = {
    "metoprolol": [12.5, 25, 50, 100], "lisinopril": [5, 10, 20, 40], "amoxicillin": [250, 500, 875],
    "metformin": [500, 850, 1000], "atorvastatin": [10, 20, 40, 80], "furosemide": [20, 40, 80],
    "ondansetron": [4, 8], "morphine": [2, 4, 5, 10], "heparin": [5000, 7500], "ceftriaxone": [1000, 2000],
    "vancomycin": [750, 1000, 1250], "prednisone": [5, 10, 20, 40], "acetaminophen": [325, 500, 650, 1000],
    "ibuprofen": [200, 400, 600, 800], "pantoprazole": [20, 40], "enoxaparin": [30, 40, 60, 80],
    "gabapentin": [100, 300, 600], "sertraline": [25, 50, 100], "levothyroxine": [0.025, 0.05, 0.1],
    "amlodipine": [2.5, 5, 10], "hydralazine": [10, 25, 50], "lorazepam": [0.5, 1, 2],
    "haloperidol": [1, 2, 5], "insulin glargine": [10, 20, 30], "nitroglycerin": [0.4],
    "ketorolac": [15, 30], "diphenhydramine": [25, 50], "clopidogrel": [75], "warfarin": [2, 5],
    "azithromycin": [250, 500],
}
# Routes each drug may take, so orders stay clinically plausible.
_ROUTES_OF = {
    "morphine": ["IV", "PO", "SC"], "heparin": ["SC", "IV"], "ceftriaxone": ["IV", "IM"],
    "vancomycin": ["IV"], "ondansetron": ["IV", "PO"], "furosemide": ["PO", "IV"], "enoxaparin": ["SC"],
    "pantoprazole": ["PO", "IV"], "lorazepam": ["PO", "IV", "SL"], "haloperidol": ["PO", "IM"],
    "insulin glargine": ["SC"], "nitroglycerin": ["SL"], "ketorolac": ["IV", "IM"],
    "diphenhydramine": ["PO", "IV"], "acetaminophen": ["PO", "PR"],
}
_ROUTE_WORDS = {
    "PO": ["by mouth", "orally", "PO", "p.o."], "IV": ["IV", "intravenously", "IV push"],
    "IM": ["IM", "intramuscularly"], "SC": ["subcutaneously", "subcut", "SC"],
    "SL": ["sublingually", "under the tongue", "SL"], "PR": ["per rectum", "rectally", "PR"],
}
_FREQ_WORDS = {
    "QD": ["once daily", "daily", "every day"], "BID": ["twice daily", "twice a day", "BID"],
    "TID": ["three times daily", "three times a day", "TID"], "QID": ["four times daily", "QID"],
    "Q4H": ["every 4 hours", "q4h"], "Q6H": ["every 6 hours", "q6h"], "Q8H": ["every 8 hours", "q8h"],
    "QHS": ["at bedtime", "nightly at bedtime", "qhs"], "PRN": ["as needed", "PRN"],
}
_TEMPLATES = [
    "Start {drug} {dose} mg {route} {freq}.",
    "Give {drug} {dose} mg {route} {freq}.",
    "{Drug} {dose} mg {route} {freq}",
    "Please administer {dose} mg of {drug} {route} {freq}.",
    "Order: {drug} {dose}mg {route} {freq}.",
    "Continue {drug} at {dose} mg {route} {freq}.",
    "Pt to receive {drug} {dose} mg {route}, {freq}.",
]


def _fmt_dose(dose: float) -> str:
    return str(int(dose)) if float(dose).is_integer() else str(dose)


def make_orders(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n (order text, target JSON string) pairs, deterministic in seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        drug = rng.choice(sorted(_DRUGS))
        dose = rng.choice(_DRUGS[drug])
        route = rng.choice(_ROUTES_OF.get(drug, ["PO"]))
        freq = rng.choice(sorted(_FREQ_WORDS))
        text = rng.choice(_TEMPLATES).format(
            drug=drug, Drug=drug.capitalize(), dose=_fmt_dose(dose),
            route=rng.choice(_ROUTE_WORDS[route]), freq=rng.choice(_FREQ_WORDS[freq]))
        target = json.dumps({"drug": drug, "dose_mg": dose, "route": route, "frequency": freq})
        out.append({"order": text, "json": target})
    return out


def _malformed_jsonl_lines() -> list[str]:
    return [
        '{"instruction": "Convert this medication order to JSON.", "input": "Give aspirin 81 mg PO daily."',  # cut off
        json.dumps({"instruction": "Convert this medication order to JSON.", "input": "Start digoxin 0.125 mg PO daily."}),  # no output
        json.dumps({"text": "not an instruction row"}),
    ]


def sample_files(n: int = 320, seed: int = 0) -> dict[str, bytes]:
    """File name -> bytes: half the orders as Alpaca JSONL, half as chat-messages Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    orders = make_orders(n, seed)
    half = n // 2
    lines = [json.dumps({"instruction": "Convert this medication order to JSON.", "input": o["order"],
                         "output": o["json"]}) for o in orders[:half]]
    lines += _malformed_jsonl_lines()
    lines.append(lines[0])  # an exact duplicate, for dedup to catch
    jsonl = ("\n".join(lines) + "\n").encode()

    rows = [{"messages": [{"role": "user", "content": o["order"]},
                          {"role": "assistant", "content": o["json"]}]} for o in orders[half:]]
    rows.append({"messages": [{"role": "user", "content": "Give aspirin 81 mg PO daily."}]})  # no answer
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return {"orders-alpaca.jsonl": jsonl, "orders-chat.parquet": buf.getvalue()}


TOOL_SYSTEM_PROMPT = "You are a pharmacy assistant. Place the medication orders you are given."
PLACE_ORDER: dict[str, Any] = {"type": "function", "function": {
    "name": "place_order",
    "description": "Send a medication order to the pharmacy.",
    "parameters": {"type": "object", "additionalProperties": False,
                   "required": ["drug", "dose_mg", "route", "frequency"],
                   "properties": {"drug": {"type": "string"}, "dose_mg": {"type": "number"},
                                  "route": {"enum": sorted(_ROUTE_WORDS)},
                                  "frequency": {"enum": sorted(_FREQ_WORDS)}}}}}


def _question(rng: random.Random) -> tuple[str, str]:
    """A question no order answers: which code a route or frequency phrase stands for."""
    codes = _ROUTE_WORDS if rng.random() < 0.5 else _FREQ_WORDS
    code = rng.choice(sorted(codes))
    return f"Which code stands for '{rng.choice(codes[code])}'?", code


def _tool_conversation(order: dict[str, Any], number: int, full: bool) -> list[dict[str, Any]]:
    """An order placed: the call, and (``full``) the pharmacy's reply and the confirmation."""
    args = json.loads(order["json"])
    msgs: list[dict[str, Any]] = [
        {"role": "user", "content": order["order"]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": f"call_{number}", "type": "function",
             "function": {"name": "place_order", "arguments": json.dumps(args)}}]}]
    if full:
        rx = f"RX-{1000 + number}"
        msgs += [{"role": "tool", "tool_call_id": f"call_{number}",
                  "content": json.dumps({"order_id": rx, "status": "placed"})},
                 {"role": "assistant", "content": f"Placed {rx}: {args['drug']} {_fmt_dose(args['dose_mg'])} mg "
                                                  f"{args['route']} {args['frequency']}."}]
    return msgs


def _as_sharegpt(msgs: list[dict[str, Any]]) -> list[dict[str, str]]:
    turns = []
    for m in msgs:
        if m.get("tool_calls"):
            fn = m["tool_calls"][0]["function"]
            turns.append({"from": "function_call",
                          "value": json.dumps({"name": fn["name"], "arguments": json.loads(fn["arguments"])})})
        else:
            turns.append({"from": {"user": "human", "assistant": "gpt", "tool": "observation"}[m["role"]],
                          "value": m["content"]})
    return turns


def tool_sample_files(n: int = 320, seed: int = 0) -> dict[str, bytes]:
    """File name -> bytes: orders placed through ``place_order`` (every other one ending on the call, the
    answer evaluated), one row in five a question answered without a call, plus two malformed rows."""
    rng = random.Random(seed + 1)
    orders = make_orders(n, seed)
    rows: list[list[dict[str, Any]]] = []
    for i, order in enumerate(orders):
        if i % 5 == 4:
            question, code = _question(rng)
            rows.append([{"role": "user", "content": question}, {"role": "assistant", "content": code}])
        else:
            rows.append(_tool_conversation(order, i, full=i % 2 == 0))
    half = len(rows) // 2
    chat = [{"tools": [PLACE_ORDER], "messages": m} for m in rows[:half]]
    bad = _tool_conversation(orders[0], 0, full=False)
    bad[1]["tool_calls"][0]["function"]["name"] = "cancel_order"
    chat.append({"tools": [PLACE_ORDER], "messages": bad})  # calls a function it was not given
    share = [{"tools": json.dumps([PLACE_ORDER["function"]]), "conversations": _as_sharegpt(m)} for m in rows[half:]]
    broken = _as_sharegpt(_tool_conversation(orders[1], 1, full=False))
    broken[1]["value"] = broken[1]["value"][:-5]  # arguments cut off
    share.append({"tools": json.dumps([PLACE_ORDER["function"]]), "conversations": broken})
    return {"orders-tools-chat.jsonl": "".join(json.dumps(r) + "\n" for r in chat).encode(),
            "orders-tools-sharegpt.jsonl": "".join(json.dumps(r) + "\n" for r in share).encode()}
