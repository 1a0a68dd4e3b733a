"""What response_format costs and buys: the same prompts answered free and held to a JSON schema.

Both sides run ``ray_qlora.generation.generate`` (what the transformers
engine and the evaluate stage run) on the same model, prompts and greedy
settings, in batches; the constrained side adds the grammar that
``ray_qlora.structured`` compiles for the schema (xgrammar, as vLLM uses).
The model is the *untuned* base, on the demo's medication orders: what a
client gets before any fine-tuning. Prints, for each side, the share of
answers that validate against the schema, and generated tokens/s; then the
ratio constrained / free tokens/s (the grammar's per-token cost) and the
schema's compile time (paid once per schema and replica, then cached).

    python benchmarks/structured_output.py                      # SmolLM2-135M, 32 orders
    python benchmarks/structured_output.py --base DIR --n 4     # smoke (what the tests run)
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

# The demo's orders (jobs/configs/demo.yaml, eval.json_schema).
SCHEMA = {"type": "object", "required": ["drug", "dose_mg", "route", "frequency"], "additionalProperties": False,
          "properties": {"drug": {"type": "string", "minLength": 1}, "dose_mg": {"type": "number", "exclusiveMinimum": 0},
                         "route": {"enum": ["PO", "IV", "IM", "SC", "SL", "PR"]},
                         "frequency": {"enum": ["QD", "BID", "TID", "QID", "Q4H", "Q6H", "Q8H", "QHS", "PRN"]}}}


def _side(model: Any, tok: Any, convs: list, new_tokens: int, batch_size: int, grammar: Any) -> dict[str, Any]:
    from jsonschema import Draft202012Validator

    from ray_qlora.generation import generate

    start = time.perf_counter()
    outs = generate(model, tok, convs, new_tokens, batch_size, grammar=grammar)
    wall = time.perf_counter() - start
    validator = Draft202012Validator(SCHEMA)

    def valid(text: str) -> bool:
        try:
            return validator.is_valid(json.loads(text))
        except json.JSONDecodeError:
            return False

    tokens = sum(o["completion_tokens"] for o in outs)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "schema_valid": sum(valid(o["text"]) for o in outs) / len(outs),
            "stopped": sum(o["finish_reason"] == "stop" for o in outs) / len(outs), "first": outs[0]["text"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--n", type=int, default=32, help="orders answered on each side")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64, help="enough for the longest order's JSON")
    args = p.parse_args(argv)

    import torch

    from ray_qlora.config import ModelConfig, StorageConfig
    from ray_qlora.data.sample import SYSTEM_PROMPT, make_orders
    from ray_qlora.modeling import load_16bit, load_tokenizer, resolve_base
    from ray_qlora.structured import Grammars

    torch.set_num_threads(2)
    path = resolve_base(ModelConfig(base=args.base), StorageConfig())
    tok, model = load_tokenizer(path), load_16bit(path, "float32", "cpu")
    convs = [[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": o["order"]}]
             for o in make_orders(args.n)]
    start = time.perf_counter()
    grammar = Grammars(tok, int(model.config.vocab_size)).compile(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - start
    print(f"{args.base}, untuned: {args.n} orders, batches of {args.batch_size}, up to {args.new_tokens} "
          f"new tokens, greedy; schema compiled in {compile_s * 1000:.0f} ms", flush=True)
    free = _side(model, tok, convs, args.new_tokens, args.batch_size, None)
    held = _side(model, tok, convs, args.new_tokens, args.batch_size, grammar)
    print(f"{'side':<14}{'schema_valid':>14}{'stopped':>10}{'tokens':>9}{'tokens/s':>10}")
    for name, side in (("free", free), ("constrained", held)):
        print(f"{name:<14}{side['schema_valid']:>13.0%} {side['stopped']:>9.0%} {side['tokens']:>8} "
              f"{side['tokens_per_s']:>9.1f}")
    print(f"  free:        {free['first'][:100]!r}\n  constrained: {held['first'][:100]!r}")
    ratio = held["tokens_per_s"] / free["tokens_per_s"]
    print(f"ratio constrained / free tokens/s: {ratio:.2f}")
    return {"free": free, "constrained": held, "ratio": ratio, "compile_s": compile_s}


if __name__ == "__main__":
    main()
