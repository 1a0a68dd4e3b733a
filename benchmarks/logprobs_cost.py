"""What logprobs cost on the transformers engine: the same prompts answered with and without them.

All sides run ``ray_qlora.generation`` (what the transformers engine runs) on
the same model, prompts and greedy settings: batched ``generate_text`` free,
with each token's logprob (``logprobs=0``) and with 20 alternatives per token
(the most a request may ask for); then one streamed answer at a time
(``stream_text``), free and with 20 alternatives, since a stream also works
out which tokens each chunk's text holds. Prints generated tokens/s per side,
the ratio with / without logprobs for batched and streamed generation, and
checks that asking for logprobs does not change a single answer.

    python benchmarks/logprobs_cost.py                      # SmolLM2-135M, 16 orders
    python benchmarks/logprobs_cost.py --base DIR --n 4     # smoke (what the tests run)
"""

from __future__ import annotations

import argparse
import time
from typing import Any


def _batched(model: Any, tok: Any, prompts: list[str], new_tokens: int, batch_size: int,
             logprobs: int | None) -> dict[str, Any]:
    from ray_qlora.generation import generate_text

    start = time.perf_counter()
    outs = generate_text(model, tok, prompts, new_tokens, batch_size, logprobs=logprobs)
    wall = time.perf_counter() - start
    tokens = sum(o["completion_tokens"] for o in outs)
    return {"tokens": tokens, "tokens_per_s": tokens / wall, "texts": [o["text"] for o in outs]}


def _streamed(model: Any, tok: Any, prompts: list[str], new_tokens: int, logprobs: int | None) -> dict[str, Any]:
    from ray_qlora.generation import stream_text

    start, tokens, texts = time.perf_counter(), 0, []
    for prompt in prompts:
        events = list(stream_text(model, tok, prompt, new_tokens, logprobs=logprobs))
        tokens += events[-1]["completion_tokens"]
        texts.append("".join(e.get("text", "") for e in events))
    wall = time.perf_counter() - start
    return {"tokens": tokens, "tokens_per_s": tokens / wall, "texts": texts}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--n", type=int, default=16, help="orders answered on each side")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args(argv)

    import torch

    from ray_qlora.config import ModelConfig, StorageConfig
    from ray_qlora.data.sample import SYSTEM_PROMPT, make_orders
    from ray_qlora.generation import render
    from ray_qlora.modeling import load_16bit, load_tokenizer, resolve_base

    torch.set_num_threads(2)
    path = resolve_base(ModelConfig(base=args.base), StorageConfig())
    tok, model = load_tokenizer(path), load_16bit(path, "float32", "cpu")
    prompts = [render(tok, [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": o["order"]}])
               for o in make_orders(args.n)]
    print(f"{args.base}: {args.n} orders, up to {args.new_tokens} new tokens, greedy; batches of {args.batch_size}, "
          "then streamed one at a time", flush=True)
    sides = {
        "batched, free": _batched(model, tok, prompts, args.new_tokens, args.batch_size, None),
        "batched, logprobs": _batched(model, tok, prompts, args.new_tokens, args.batch_size, 0),
        "batched, top 20": _batched(model, tok, prompts, args.new_tokens, args.batch_size, 20),
        "streamed, free": _streamed(model, tok, prompts, args.new_tokens, None),
        "streamed, top 20": _streamed(model, tok, prompts, args.new_tokens, 20),
    }
    print(f"{'side':<20}{'tokens':>8}{'tokens/s':>10}")
    for name, side in sides.items():
        print(f"{name:<20}{side['tokens']:>8}{side['tokens_per_s']:>10.1f}")
    texts = [s["texts"] for s in sides.values()]
    same = all(t == texts[0] for t in texts[:3]) and texts[3] == texts[4]
    batched = sides["batched, top 20"]["tokens_per_s"] / sides["batched, free"]["tokens_per_s"]
    streamed = sides["streamed, top 20"]["tokens_per_s"] / sides["streamed, free"]["tokens_per_s"]
    print(f"answers unchanged by asking for logprobs: {same}")
    print(f"ratio top-20 logprobs / free tokens/s: batched {batched:.2f}, streamed {streamed:.2f}")
    return {"sides": sides, "same_answers": same, "batched_ratio": batched, "streamed_ratio": streamed}


if __name__ == "__main__":
    main()
