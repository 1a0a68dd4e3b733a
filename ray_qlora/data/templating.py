"""Chat template + tokenization with labels on assistant turns only.

The loss must teach the model to answer, not to echo prompts: every token
outside an assistant turn gets label -100. The end-of-turn token that closes
each assistant turn keeps its label, or the model never learns to stop.

Spans are found by rendering the conversation up to each assistant turn with
``add_generation_prompt=True``; that token prefix ends exactly where the
assistant's answer starts. This works for any template that renders earlier
turns the same way whatever follows, which is checked per row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray_qlora.data.formats import RowError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["IGNORE_INDEX", "end_of_turn_id", "tokenize_conversation"]

IGNORE_INDEX = -100


def end_of_turn_id(tok: "PreTrainedTokenizerBase") -> int:
    """The token that closes an assistant turn (ChatML's <|im_end|> is the eos of chat models)."""
    if tok.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to close assistant turns")
    return int(tok.eos_token_id)


def _render(tok: "PreTrainedTokenizerBase", msgs: list[dict[str, str]], gen_prompt: bool) -> list[int]:
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


def tokenize_conversation(
    tok: "PreTrainedTokenizerBase",
    msgs: list[dict[str, str]],
    max_len: int,
    policy: str = "quarantine",
) -> dict[str, Any]:
    """Messages -> {input_ids, labels, num_tokens, num_label_tokens}.

    ``policy`` decides an example over ``max_len``: 'quarantine' raises
    RowError, 'truncate' cuts it (and fails only if no label survives).
    """
    ids = _render(tok, msgs, gen_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    eot = end_of_turn_id(tok)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = len(_render(tok, msgs[:i], gen_prompt=True))
        end = len(_render(tok, msgs[: i + 1], gen_prompt=False))
        prefix = _render(tok, msgs[: i + 1], gen_prompt=False)
        if ids[:end] != prefix or start > end:
            raise RowError("chat template is not prefix-stable for this conversation")
        # Label through the end-of-turn token, not the whitespace the template puts after it.
        span = ids[start:end]
        stop = start + (len(span) - span[::-1].index(eot) if eot in span else len(span))
        labels[start:stop] = ids[start:stop]
    if len(ids) > max_len:
        if policy == "quarantine":
            raise RowError(f"too long: {len(ids)} tokens > data.max_seq_length={max_len}")
        ids, labels = ids[:max_len], labels[:max_len]
    n_label = sum(1 for x in labels if x != IGNORE_INDEX)
    if n_label == 0:
        raise RowError("no assistant tokens left to learn from")
    return {"input_ids": ids, "labels": labels, "num_tokens": len(ids), "num_label_tokens": n_label}
