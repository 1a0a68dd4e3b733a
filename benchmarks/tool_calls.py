"""What a forced tool_choice costs and buys: the same orders answered as tool calls, prompted and forced.

Every side runs ``ray_qlora.generation.generate`` (what the transformers engine
runs) on the same untuned model, prompts and greedy settings, in batches, and
reads its calls with ``ray_qlora.serve.tools.read_calls``, as the server does:

- prompted: tool_choice 'auto'. The tool goes to the chat template as the
  server passes it: SmolLM2's template shows no tools, so the project's tool
  front lists it in the system prompt with the instruction to answer
  ``<tool_call>{"name", "arguments"}</tool_call>`` (data/templating.py); the
  calls are read from the free text.
- named: tool_choice {"type": "function", "function": {"name": "place_order"}};
  the arguments are generated under the tool's parameters schema.
- required: tool_choice 'required' with parallel_tool_calls false; a list of
  one {name, parameters} call under the schema vLLM builds for it.

Prints, for each side, the share of answers that are one valid call (the
right function, arguments that validate against its parameters) and
generated tokens/s; then the ratio named / prompted tokens/s.

    python benchmarks/tool_calls.py                      # SmolLM2-135M, 32 orders
    python benchmarks/tool_calls.py --base DIR --n 4     # smoke (what the tests run)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from structured_output import SCHEMA  # noqa: E402  (the demo's orders, as structured_output.py holds them)

TOOL = {"name": "place_order", "description": "Place one medication order.", "parameters": SCHEMA}



def _valid_call(read: dict[str, Any]) -> bool:
    from jsonschema import Draft202012Validator

    calls = read["tool_calls"] or []
    if len(calls) != 1 or calls[0]["function"]["name"] != TOOL["name"]:
        return False
    try:
        return Draft202012Validator(SCHEMA).is_valid(json.loads(calls[0]["function"]["arguments"]))
    except json.JSONDecodeError:
        return False


def _side(model: Any, tok: Any, convs: list, new_tokens: int, batch_size: int, grammar: Any,
          mode: str) -> dict[str, Any]:
    from ray_qlora.generation import generate
    from ray_qlora.serve.tools import read_calls

    start = time.perf_counter()
    tools = [[{"type": "function", "function": TOOL}]] * len(convs)  # as the server hands a request's tools over
    outs = generate(model, tok, convs, new_tokens, batch_size, grammar=grammar, tools=tools)
    wall = time.perf_counter() - start
    reads = [read_calls(o, mode, TOOL["name"], tok=tok, functions=[TOOL]) for o in outs]  # type: ignore[arg-type]
    tokens = sum(o["completion_tokens"] for o in outs)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "valid_calls": sum(map(_valid_call, reads)) / len(outs),
            "stopped": sum(r["finish_reason"] in ("stop", "tool_calls") for r in reads) / len(outs),
            "first": outs[0]["text"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--n", type=int, default=32, help="orders answered on each side")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=80, help="enough for the longest order's call")
    args = p.parse_args(argv)

    import torch

    from ray_qlora.config import ModelConfig, StorageConfig
    from ray_qlora.data.sample import SYSTEM_PROMPT, make_orders
    from ray_qlora.modeling import load_16bit, load_tokenizer, resolve_base
    from ray_qlora.serve.tools import call_schema
    from ray_qlora.structured import Grammars

    torch.set_num_threads(2)
    path = resolve_base(ModelConfig(base=args.base), StorageConfig())
    tok, model = load_tokenizer(path), load_16bit(path, "float32", "cpu")
    convs = [[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": o["order"]}]
             for o in make_orders(args.n)]
    grammars = Grammars(tok, int(model.config.vocab_size))
    named = grammars.compile(json.dumps(call_schema([TOOL], "named", TOOL["name"])))
    required = grammars.compile(json.dumps(call_schema([TOOL], "required", None, parallel=False)))
    print(f"{args.base}, untuned: {args.n} orders, batches of {args.batch_size}, up to {args.new_tokens} new "
          "tokens, greedy; one tool (place_order), described in the system prompt", flush=True)
    sides = {"prompted": _side(model, tok, convs, args.new_tokens, args.batch_size, None, "auto"),
             "named": _side(model, tok, convs, args.new_tokens, args.batch_size, named, "named"),
             "required": _side(model, tok, convs, args.new_tokens, args.batch_size, required, "required")}
    print(f"{'tool_choice':<12}{'valid_calls':>13}{'stopped':>10}{'tokens':>9}{'tokens/s':>10}")
    for name, side in sides.items():
        print(f"{name:<12}{side['valid_calls']:>12.0%} {side['stopped']:>9.0%} {side['tokens']:>8} "
              f"{side['tokens_per_s']:>9.1f}")
    for name, side in sides.items():
        print(f"  {name + ':':<10} {side['first'][:110]!r}")
    ratio = sides["named"]["tokens_per_s"] / sides["prompted"]["tokens_per_s"]
    print(f"ratio named / prompted tokens/s: {ratio:.2f}")
    return {"sides": sides, "ratio": ratio}


if __name__ == "__main__":
    main()
