"""Chat template + tokenization with labels on assistant turns only.

The loss must teach the model to answer, not to echo prompts: every token
outside an assistant turn gets label -100. The end-of-turn token that closes
each assistant turn keeps its label, or the model never learns to stop.

Answers are found by rendering the conversation up to each assistant turn
with ``add_generation_prompt=True``: that is the prompt the server builds at
inference, so it must be a prefix of the training render, and the answer
starts where it ends. The render is cut there and at each answer's end, and
the pieces are tokenized on their own, so a prompt's tokens are the ones the
server sends. Whether the prompt is a prefix, and whether each turn's
end-of-turn token got its label, is recorded per row as a check failure;
``data/checks.py`` turns those into a stage failure before any training.

Plain-text examples (role ``text``) are tokenized as they are plus the eos
token, every token labelled: continued pre-training.

Tool use is rendered by the chat template like everything else (its calls
are answer tokens, its results prompt tokens), with the row's tools passed as
``tools``, as the server passes a request's. Most small models' templates
(SmolLM2's among them) write neither: ``set_chat_template`` then puts
``TOOL_USE_TEMPLATE`` in front of the template, which rewrites the
conversation the way Hermes-format models read it (tools listed in the system
prompt, calls in ``<tool_call>`` tags, results in ``<tool_response>`` tags
in a user turn) before the template runs. The saved model carries that
template, so training, both serving engines and the exports render a
conversation alike, and the server reads calls back in the same tags.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from ray_qlora.data.formats import TEXT_ROLE, RowError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "CHECK_EOT_LABELLED",
    "CHECK_LABELS_NONEMPTY",
    "CHECK_PROMPT_PREFIX",
    "IGNORE_INDEX",
    "NAMED_TEMPLATES",
    "TOOL_USE_TEMPLATE",
    "end_of_turn_id",
    "set_chat_template",
    "tokenize_conversation",
    "tokenize_conversations",
    "uses_tool_front",
    "writes_tool_use",
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


# Put in front of a template that writes no tool use (see the module docstring). It only rewrites
# ``messages`` (and clears ``tools``, now in the system prompt) and prints nothing, so a conversation
# without tools renders exactly as the template alone renders it.
TOOL_USE_TEMPLATE = (
    "{#- ray-qlora: tool use as Hermes tags (tools in the system prompt, <tool_call>, <tool_response>) -#}\n"
    "{%- set rq = namespace(msgs=[], start=0, results='', text='') -%}\n"
    "{%- if tools -%}\n"
    "  {%- set rq.text = '# Tools\\n\\nYou can call the functions below; their signatures, one per line, are "
    "inside <tools></tools>:\\n<tools>' -%}\n"
    "  {%- for t in tools -%}{%- set rq.text = rq.text + '\\n' + (t | tojson) -%}{%- endfor -%}\n"
    "  {%- set rq.text = rq.text + '\\n</tools>\\n\\nTo call one, write a JSON object with its name and "
    "arguments inside <tool_call></tool_call> tags:\\n<tool_call>\\n{\"name\": <function name>, "
    "\"arguments\": <arguments object>}\\n</tool_call>\\nResults come back inside "
    "<tool_response></tool_response> tags.' -%}\n"
    "  {%- if messages and messages[0].role == 'system' -%}\n"
    "    {%- set rq.msgs = [{'role': 'system', 'content': messages[0].content + '\\n\\n' + rq.text}] -%}\n"
    "    {%- set rq.start = 1 -%}\n"
    "  {%- else -%}{%- set rq.msgs = [{'role': 'system', 'content': rq.text}] -%}{%- endif -%}\n"
    "{%- endif -%}\n"
    "{%- for m in messages[rq.start:] -%}\n"
    "  {%- if m.role == 'tool' -%}\n"
    "    {%- set rq.results = rq.results + ('\\n' if rq.results else '') + '<tool_response>\\n' + m.content "
    "+ '\\n</tool_response>' -%}\n"
    "  {%- else -%}\n"
    "    {%- if rq.results -%}\n"
    "      {%- set rq.msgs = rq.msgs + [{'role': 'user', 'content': rq.results}] -%}{%- set rq.results = '' -%}\n"
    "    {%- endif -%}\n"
    "    {%- if m.role == 'assistant' and m.tool_calls -%}\n"
    "      {%- set rq.text = m.content or '' -%}\n"
    "      {%- for c in m.tool_calls -%}\n"
    "        {%- set f = c.function if c.function is defined else c -%}\n"
    "        {%- set args = f.arguments if f.arguments is string else (f.arguments | tojson) -%}\n"
    "        {%- set rq.text = rq.text + ('\\n' if rq.text else '') + '<tool_call>\\n{\"name\": ' "
    "+ (f.name | tojson) + ', \"arguments\": ' + args + '}\\n</tool_call>' -%}\n"
    "      {%- endfor -%}\n"
    "      {%- set rq.msgs = rq.msgs + [{'role': 'assistant', 'content': rq.text}] -%}\n"
    "    {%- else -%}{%- set rq.msgs = rq.msgs + [m] -%}{%- endif -%}\n"
    "  {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if rq.results -%}{%- set rq.msgs = rq.msgs + [{'role': 'user', 'content': rq.results}] -%}{%- endif -%}\n"
    "{%- set messages = rq.msgs -%}\n"
    "{%- set tools = none %}"
)

# A conversation with a tool, a call and its result: a template that writes all of these writes tool use.
# The call id is 9 alphanumerics: Mistral's templates refuse any other shape.
_PROBE_TOOLS = [{"type": "function", "function": {"name": "rq_probe_tool", "description": "probe",
                                                  "parameters": {"type": "object", "properties": {}}}}]
_PROBE = [{"role": "user", "content": "hi"},
          {"role": "assistant", "content": "", "tool_calls": [
              {"id": "rqprobe01", "type": "function",
               "function": {"name": "rq_probe_call", "arguments": {"rq_probe_arg": 1}}}]},
          {"role": "tool", "tool_call_id": "rqprobe01", "content": "rq_probe_result"}]


def writes_tool_use(tok: "PreTrainedTokenizerBase", template: str | None = None) -> bool:
    """Whether a chat template (the tokenizer's by default) shows tools, calls and results to the model."""
    try:
        text = tok.apply_chat_template(_PROBE, tools=_PROBE_TOOLS, chat_template=template, tokenize=False,
                                       add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template raises what it likes (often raise_exception) on roles it refuses
        return False
    return isinstance(text, str) and all(
        s in text for s in ("rq_probe_tool", "rq_probe_call", "rq_probe_arg", "rq_probe_result"))


def set_chat_template(tok: "PreTrainedTokenizerBase", template: str | None) -> None:
    """Apply ``data.chat_template`` (a name from NAMED_TEMPLATES or Jinja text) to a tokenizer, made
    to write tool use (TOOL_USE_TEMPLATE in front) when it writes none.

    Raises ValueError naming the config key when the tokenizer ends up with
    no template, or a named template's special tokens are not in its vocabulary.
    """
    _set_template(tok, template)
    if isinstance(tok.chat_template, dict):  # named templates ('default', 'tool_use', ...): each one checked
        tok.chat_template = {name: _with_tool_front(tok, text) for name, text in tok.chat_template.items()}
    elif isinstance(tok.chat_template, str):
        tok.chat_template = _with_tool_front(tok, tok.chat_template)


def _with_tool_front(tok: "PreTrainedTokenizerBase", template: str) -> str:
    return template if writes_tool_use(tok, template) else TOOL_USE_TEMPLATE + template


def pick_template(template: str | dict[str, str], tools: Any = None) -> str:
    """The one template a render uses, picked among named ones (a dict) as transformers picks: 'tool_use'
    when tools are passed and there is one, else 'default'. Where a template is handed to
    ``apply_chat_template`` as text (a registry adapter's), the same conversation renders as in training."""
    if isinstance(template, str):
        return template
    name = "tool_use" if tools is not None and "tool_use" in template else "default"
    if name not in template:
        raise ValueError(f"named chat templates {sorted(template)} have no 'default' to use")
    return template[name]


def uses_tool_front(tok: "PreTrainedTokenizerBase") -> bool:
    """Whether the tokenizer's template (any of its named templates) writes tool use through the tool front."""
    templates = tok.chat_template.values() if isinstance(tok.chat_template, dict) else [tok.chat_template]
    return any(isinstance(t, str) and t.startswith(TOOL_USE_TEMPLATE) for t in templates)


def _set_template(tok: "PreTrainedTokenizerBase", template: str | None) -> None:
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


def _render(tok: "PreTrainedTokenizerBase", msgs: list[dict[str, Any]], gen_prompt: bool) -> list[int]:
    return tok(_render_text(tok, msgs, gen_prompt), add_special_tokens=False)["input_ids"]


def _render_text(tok: "PreTrainedTokenizerBase", msgs: list[dict[str, Any]], gen_prompt: bool,
                 tools: list[dict[str, Any]] | None = None) -> str:
    return tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=gen_prompt)


# A conversation split into text pieces at its turn boundaries: (text, labelled).
_Pieces = list[tuple[str, bool]]


def _chat_pieces(tok: "PreTrainedTokenizerBase", msgs: list[dict[str, Any]],
                 tools: list[dict[str, Any]] | None = None) -> tuple[_Pieces, list[str]]:
    """The training render cut at each assistant turn's start (where the inference prompt ends) and end.

    An answer piece runs from the end of the inference prompt for that turn
    (``add_generation_prompt=True`` on the turns before it) to the end of the
    render through that turn. A prompt that is not a text prefix of the
    render is a check failure: the server would prompt with text the model
    never saw in training.
    """
    full = _render_text(tok, msgs, False, tools)
    cuts: list[tuple[int, int]] = []
    failures: list[str] = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = _render_text(tok, msgs[:i], True, tools)
        upto = full if i == len(msgs) - 1 else _render_text(tok, msgs[: i + 1], False, tools)
        start, end = len(prompt), len(upto)
        if not (full.startswith(prompt) and full.startswith(upto) and start <= end) or (cuts and start < cuts[-1][1]):
            failures.append(CHECK_PROMPT_PREFIX)
            continue
        cuts.append((start, end))
    pieces: _Pieces = []
    at = 0
    for start, end in cuts:
        pieces += [(full[at:start], False), (full[start:end], True)]
        at = end
    pieces.append((full[at:], False))
    return [(text, labelled) for text, labelled in pieces if text], failures


def _assemble(piece_ids: list[list[int]], pieces: _Pieces, eot: int) -> tuple[list[int], list[int], list[str]]:
    """Token ids and labels from tokenized pieces: an answer is labelled through its last end-of-turn token."""
    ids: list[int] = []
    labels: list[int] = []
    failures: list[str] = []
    for tokens, (_, labelled) in zip(piece_ids, pieces):
        ids += tokens
        if not labelled:
            labels += [IGNORE_INDEX] * len(tokens)
        elif eot in tokens:  # not the whitespace the template puts after it
            stop = len(tokens) - tokens[::-1].index(eot)
            labels += tokens[:stop] + [IGNORE_INDEX] * (len(tokens) - stop)
        else:
            failures.append(CHECK_EOT_LABELLED)
            labels += tokens
    return ids, labels, failures


def _finish(ids: list[int], labels: list[int], failures: list[str], max_len: int, policy: str) -> dict[str, Any]:
    if len(ids) > max_len:
        if policy == "quarantine":
            raise RowError(f"too long: {len(ids)} tokens > data.max_seq_length={max_len}")
        ids, labels = ids[:max_len], labels[:max_len]
        if all(x == IGNORE_INDEX for x in labels):
            raise RowError(f"no assistant tokens left after truncation to data.max_seq_length={max_len}")
    n_label = sum(1 for x in labels if x != IGNORE_INDEX)
    if n_label == 0:
        failures = [*failures, CHECK_LABELS_NONEMPTY]
    return {"input_ids": ids, "labels": labels, "num_tokens": len(ids), "num_label_tokens": n_label,
            "check_failures": sorted(set(failures))}


def tokenize_conversations(
    tok: "PreTrainedTokenizerBase",
    convs: list[list[dict[str, Any]]],
    max_len: int,
    policy: str = "quarantine",
    eot: int | None = None,
    tools: Sequence[list[dict[str, Any]] | None] | None = None,
) -> list[dict[str, Any] | RowError]:
    """Conversations -> per conversation {input_ids, labels, num_tokens, num_label_tokens,
    check_failures}, or the RowError that puts it in quarantine.

    Each piece of text is tokenized once, and every piece of every
    conversation goes to the tokenizer in one call; row by row, with the
    prompt tokenized again beside the whole render, tokenizing cost about
    twice as much. Pieces are tokenized on their own (as LLaMA-Factory does):
    the ids of a turn's prompt are then exactly what the server sends for
    it, which tokenizing the whole render does not promise at a boundary.

    ``policy`` decides an example over ``max_len``: 'quarantine' gives
    RowError, 'truncate' cuts it (RowError only if no label survives).
    ``check_failures`` names the template checks the row failed; those are
    the template's fault, not the row's, so they stop the stage instead of
    quarantining the row. ``tools``: each conversation's function tools (None: none).
    """
    from jinja2.exceptions import TemplateError

    eot = end_of_turn_id(tok) if eot is None else eot
    split: list[tuple[_Pieces, list[str]] | RowError] = []
    for msgs, row_tools in zip(convs, tools or [None] * len(convs)):
        if msgs[0]["role"] == TEXT_ROLE:  # continued pre-training: every token, plus eos to end the document
            split.append(([(msgs[0]["content"], True)], []))
            continue
        try:
            split.append(_chat_pieces(tok, msgs, row_tools))
        except TemplateError as err:  # a template's own rule (raise_exception): Mistral's 9-character call ids...
            split.append(RowError(f"the chat template refuses this conversation: {err}"))
    texts = [text for s in split if not isinstance(s, RowError) for text, _ in s[0]]
    encoded = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    out: list[dict[str, Any] | RowError] = []
    at = 0
    for msgs, row in zip(convs, split):
        if isinstance(row, RowError):
            out.append(row)
            continue
        pieces, failures = row
        piece_ids = encoded[at:at + len(pieces)]
        at += len(pieces)
        if msgs[0]["role"] == TEXT_ROLE:
            ids = piece_ids[0] + ([int(tok.eos_token_id)] if tok.eos_token_id is not None else [])
            labels = list(ids)
        else:
            ids, labels, more = _assemble(piece_ids, pieces, eot)
            failures = failures + more
        try:
            out.append(_finish(ids, labels, failures, max_len, policy))
        except RowError as err:
            out.append(err)
    return out


def tokenize_conversation(
    tok: "PreTrainedTokenizerBase",
    msgs: list[dict[str, Any]],
    max_len: int,
    policy: str = "quarantine",
    eot: int | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One conversation through ``tokenize_conversations``; raises its RowError."""
    out = tokenize_conversations(tok, [msgs], max_len, policy, eot, [tools])[0]
    if isinstance(out, RowError):
        raise out
    return out
