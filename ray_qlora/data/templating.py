"""Chat template + tokenization with labels on assistant turns only.

The loss must teach the model to answer, not to echo prompts: every token
outside an assistant turn gets label -100. The end-of-turn token that closes
each assistant turn keeps its label, or the model never learns to stop.

Spans are found by rendering the conversation up to each assistant turn with
``add_generation_prompt=True``: that is the prompt the server builds at
inference, so it must be an exact token prefix of the training render, and
the answer starts where it ends. Whether it is, and whether each turn's
end-of-turn token got its label, is recorded per row as a check failure;
``data/checks.py`` turns those into a stage failure before any training.

Plain-text examples (role ``text``) are tokenized as they are plus the eos
token, every token labelled: continued pre-training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray_qlora.data.formats import TEXT_ROLE, RowError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "CHECK_EOT_LABELLED",
    "CHECK_LABELS_NONEMPTY",
    "CHECK_PROMPT_PREFIX",
    "IGNORE_INDEX",
    "NAMED_TEMPLATES",
    "end_of_turn_id",
    "set_chat_template",
    "tokenize_conversation",
]

IGNORE_INDEX = -100

# Per-row checks (names as they appear in the manifest and in errors).
CHECK_EOT_LABELLED = "end_of_turn_labelled"
CHECK_PROMPT_PREFIX = "generation_prompt_is_prefix"
CHECK_LABELS_NONEMPTY = "label_mask_nonempty"

# Templates for tokenizers that ship none, by the name a config uses. Each is
# written here from the format's public description; the special tokens must
# already be in the tokenizer's vocabulary (adding tokens would need new
# embedding rows, which a frozen 4-bit base cannot learn well).
NAMED_TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        ("<|im_start|>", "<|im_end|>"),
    ),
    "llama-3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
}


def set_chat_template(tok: "PreTrainedTokenizerBase", template: str | None) -> None:
    """Apply ``data.chat_template`` (a name from NAMED_TEMPLATES or Jinja text) to a tokenizer.

    Raises ValueError naming the config key when the tokenizer ends up with
    no template, or a named template's special tokens are not in its vocabulary.
    """
    if template is None:
        if not tok.chat_template:
            raise ValueError("the tokenizer has no chat template; set data.chat_template "
                             f"({', '.join(NAMED_TEMPLATES)}, or a Jinja template)")
        return
    if template in NAMED_TEMPLATES:
        text, needed = NAMED_TEMPLATES[template]
        vocab = tok.get_vocab()
        missing = [t for t in needed if t not in vocab]
        if missing:
            raise ValueError(f"data.chat_template: {template!r} needs tokens {missing} that this tokenizer lacks; "
                             "pick a template written in its own special tokens")
        tok.chat_template = text
    elif "{%" in template or "{{" in template:
        tok.chat_template = template
    else:
        raise ValueError(f"data.chat_template: {template!r} is neither a known name "
                         f"({', '.join(NAMED_TEMPLATES)}) nor a Jinja template")


def end_of_turn_id(tok: "PreTrainedTokenizerBase") -> int:
    """The token that closes an assistant turn under the tokenizer's chat template.

    Found by rendering a probe answer and taking the first special token after
    it (ChatML's <|im_end|>, Llama 3's <|eot_id|>); the eos token when the
    template writes none.
    """
    probe = "Q7x"
    ids = _render(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], False)
    text_ids = tok(probe, add_special_tokens=False)["input_ids"]
    special = set(tok.all_special_ids) | {int(i) for i in getattr(tok, "added_tokens_decoder", {})}
    for start in range(len(ids) - len(text_ids), -1, -1):
        if ids[start:start + len(text_ids)] == text_ids:
            for tid in ids[start + len(text_ids):]:
                if tid in special:
                    return int(tid)
            break
    if tok.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to close assistant turns")
    return int(tok.eos_token_id)


def _render(tok: "PreTrainedTokenizerBase", msgs: list[dict[str, str]], gen_prompt: bool) -> list[int]:
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


def _tokenize_text(tok: "PreTrainedTokenizerBase", text: str) -> tuple[list[int], list[int], list[str]]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        ids = ids + [int(tok.eos_token_id)]  # the model learns where a document ends
    return ids, list(ids), []


def _tokenize_chat(tok: "PreTrainedTokenizerBase", msgs: list[dict[str, str]],
                   eot: int) -> tuple[list[int], list[int], list[str]]:
    ids = _render(tok, msgs, gen_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    failures: list[str] = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = _render(tok, msgs[:i], gen_prompt=True)
        upto = ids if i == len(msgs) - 1 else _render(tok, msgs[: i + 1], gen_prompt=False)
        start, end = len(prompt), len(upto)
        if ids[:start] != prompt or ids[:end] != upto or start > end:
            failures.append(CHECK_PROMPT_PREFIX)
            continue
        # Label through the end-of-turn token, not the whitespace the template puts after it.
        span = ids[start:end]
        if eot not in span:
            failures.append(CHECK_EOT_LABELLED)
            labels[start:end] = span
            continue
        stop = start + len(span) - span[::-1].index(eot)
        labels[start:stop] = ids[start:stop]
    return ids, labels, sorted(set(failures))


def tokenize_conversation(
    tok: "PreTrainedTokenizerBase",
    msgs: list[dict[str, str]],
    max_len: int,
    policy: str = "quarantine",
    eot: int | None = None,
) -> dict[str, Any]:
    """Messages -> {input_ids, labels, num_tokens, num_label_tokens, check_failures}.

    ``policy`` decides an example over ``max_len``: 'quarantine' raises
    RowError, 'truncate' cuts it (and raises only if no label survives).
    ``check_failures`` names the template checks this row failed; those are
    the template's fault, not the row's, so they stop the stage instead of
    quarantining the row.
    """
    if msgs[0]["role"] == TEXT_ROLE:
        ids, labels, failures = _tokenize_text(tok, msgs[0]["content"])
    else:
        ids, labels, failures = _tokenize_chat(tok, msgs, end_of_turn_id(tok) if eot is None else eot)
    if len(ids) > max_len:
        if policy == "quarantine":
            raise RowError(f"too long: {len(ids)} tokens > data.max_seq_length={max_len}")
        ids, labels = ids[:max_len], labels[:max_len]
        if all(x == IGNORE_INDEX for x in labels):
            raise RowError(f"no assistant tokens left after truncation to data.max_seq_length={max_len}")
    n_label = sum(1 for x in labels if x != IGNORE_INDEX)
    if n_label == 0:
        failures = sorted({*failures, CHECK_LABELS_NONEMPTY})
    return {"input_ids": ids, "labels": labels, "num_tokens": len(ids), "num_label_tokens": n_label,
            "check_failures": failures}
