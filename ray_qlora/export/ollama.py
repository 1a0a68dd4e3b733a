"""Ollama Modelfiles whose TEMPLATE renders what the training chat template renders.

A fine-tuned model only behaves as evaluated when it is prompted with the
exact text it was trained on. Ollama does not run the Hugging Face Jinja
template; it runs a Go ``text/template`` over its own data model (``.Messages``,
each with ``.Role`` and ``.Content``; ``.System``; legacy ``.Prompt`` and
``.Response``). Translating Jinja to Go in general is not possible, so this
module does not try: it *probes* the tokenizer's template by rendering
conversations whose contents are sentinel strings, reads off each role's
prefix and suffix, the generation prompt, any BOS text at the start and any
default system turn the template injects when none is given, and writes one
fixed Go template shape filled with those pieces. The derived structure is
then replayed in Python on a set of probe conversations (odd whitespace,
braces, quotes, unicode, several turns) and compared with the Jinja
rendering; a template that does more than wrap each message in role-specific
text (numbers turns, rewrites or trims content, treats the first user turn
differently, ...) raises ``ValueError`` so the caller can leave TEMPLATE out
(Ollama then guesses one from the model's own metadata) instead of writing a
wrong one.

The written template iterates ``.Messages`` like Ollama's own modern
templates, so it is used by both ``/api/chat`` and ``/api/generate`` (Ollama
turns a generate request into system + user messages). A conversation that
ends with an assistant message is left open (no end-of-turn), which is how
Ollama continues a prefilled answer; otherwise the generation prompt follows.

Message contents are inserted verbatim by Go, which is why the pieces are
written as quoted Go string constants (``{{ "..." }}``): whitespace-trimming
markers used for layout can then never eat template text, and ``{{`` in a
role prefix cannot be parsed as an action.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "ChatStructure",
    "adapter_modelfile",
    "chat_structure",
    "go_template",
    "merged_modelfile",
    "render_go_template",
    "simulate",
    "stop_tokens",
    "write_modelfile",
]

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")

# Sentinel contents for probing: plain ASCII letters and digits (no template
# or tokenizer treats them specially) and unlikely to occur in template text.
_SYS, _USR1, _AST1, _USR2 = "qZ7sysPROBE0", "qZ7usrPROBE1", "qZ7astPROBE2", "qZ7usrPROBE3"
# Passed as ``bos_token``/``eos_token`` while probing, so BOS and EOS text
# written through the template's variables can be told apart from other text.
_BOS, _EOS = "qZ7bosPROBE9", "qZ7eosPROBE8"

Message = dict[str, str]


@dataclass(frozen=True)
class ChatStructure:
    """A chat template reduced to text around each message.

    Rendering a conversation is: ``bos + preamble``; then for each message
    ``prefix[role] + content + suffix[role]`` (the suffix left off when the
    conversation ends with an assistant message, which is continued); a
    default system turn before the first message when it is not a system
    message and ``default_system`` is not None; and ``generation_prompt``
    after a last message that is not the assistant's.
    """

    bos: str
    preamble: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation_prompt: str
    default_system: str | None


def _render(tok: "PreTrainedTokenizerBase", msgs: list[Message], *, gen: bool = False,
            cont: bool = False, probe: bool = False) -> str:
    """``apply_chat_template`` as text; with ``probe`` the template sees sentinel BOS and EOS tokens."""
    extra = {"bos_token": _BOS, "eos_token": _EOS} if probe else {}
    out = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen,
                                  continue_final_message=cont, **extra)
    if not isinstance(out, str):
        raise ValueError(f"apply_chat_template returned {type(out).__name__}, not text")
    return out


def _split_once(text: str, sentinel: str, what: str) -> tuple[str, str]:
    """The text before and after the one occurrence of ``sentinel`` (ValueError if not exactly one)."""
    if text.count(sentinel) != 1:
        raise ValueError(f"the chat template does not write the {what} content exactly once "
                         "(it rewrites, drops or repeats message contents)")
    before, after = text.split(sentinel)
    return before, after


def _strip_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise ValueError(f"the chat template's {what} is not a plain continuation of the shorter conversation "
                         "(earlier turns render differently once more turns follow)")
    return text[len(prefix):]


def _strip_suffix(text: str, suffix: str, what: str) -> str:
    if not text.endswith(suffix):
        raise ValueError(f"the chat template writes {what} differently depending on position in the conversation")
    return text[: len(text) - len(suffix)]


def _probe(tok: "PreTrainedTokenizerBase") -> ChatStructure:
    """Read the structure off renders of sentinel conversations (BOS/EOS still sentinels).

    Renders without the generation prompt give each turn's suffix. Some
    templates (Phi-3) end such a render with EOS instead of a generation
    prompt; that closing EOS is cut off first, since Ollama always renders
    either a generation prompt or an open final assistant message.
    """
    u1, a1, u2 = ({"role": "user", "content": _USR1}, {"role": "assistant", "content": _AST1},
                  {"role": "user", "content": _USR2})
    r_u = _render(tok, [u1], probe=True)
    r_u_gen = _render(tok, [u1], gen=True, probe=True)
    end = _EOS if not r_u_gen.startswith(r_u) and r_u.endswith(_EOS) else ""

    def closed(msgs: list[Message]) -> str:
        return _strip_suffix(_render(tok, msgs, probe=True), end, "the end of a conversation")

    r_u = closed([u1])
    gen = _strip_prefix(r_u_gen, r_u, "generation prompt")
    head_u, suffix_user = _split_once(r_u, _USR1, "user")

    r_ua = closed([u1, a1])
    prefix_ast, suffix_ast = _split_once(_strip_prefix(r_ua, r_u, "assistant turn"), _AST1, "assistant")

    r_uau = closed([u1, a1, u2])
    prefix_user, _ = _split_once(_strip_prefix(r_uau, r_ua, "second user turn"), _USR2, "user")
    pre = _strip_suffix(head_u, prefix_user, "the user prefix")

    r_su = closed([{"role": "system", "content": _SYS}, u1])
    head_s, rest = _split_once(r_su, _SYS, "system")
    between, _ = _split_once(rest, _USR1, "user")
    suffix_sys = _strip_suffix(between, prefix_user, "the user prefix")

    bos = _BOS if head_s.startswith(_BOS) and pre.startswith(_BOS) else ""
    prefix_sys, rest_pre = head_s[len(bos):], pre[len(bos):]
    preamble, default = "", None
    if rest_pre:
        inner = rest_pre[len(prefix_sys):]
        if rest_pre.startswith(prefix_sys) and len(inner) >= len(suffix_sys) and inner.endswith(suffix_sys):
            default = inner[: len(inner) - len(suffix_sys)]  # a system turn injected when none is given
        elif prefix_sys.startswith(rest_pre):
            preamble, prefix_sys = rest_pre, prefix_sys[len(rest_pre):]  # text written before any turn
        else:
            raise ValueError("the chat template writes text before the first user turn that is neither BOS, "
                             f"a default system turn nor a fixed preamble: {rest_pre!r}")
    return ChatStructure(bos=bos, preamble=preamble,
                         prefix={"system": prefix_sys, "user": prefix_user, "assistant": prefix_ast},
                         suffix={"system": suffix_sys, "user": suffix_user, "assistant": suffix_ast},
                         generation_prompt=gen, default_system=default)


def _unsentinel(st: ChatStructure, bos_text: str, eos_text: str) -> ChatStructure:
    """The structure with the BOS/EOS sentinels replaced by the tokenizer's real token texts.

    A template that writes BOS text literally (not via ``bos_token``) leaves it
    in the preamble; it is moved to ``bos`` so BOS handling is the same.
    """
    def fix(s: str) -> str:
        return s.replace(_BOS, bos_text).replace(_EOS, eos_text)

    out = replace(st, bos=fix(st.bos), preamble=fix(st.preamble),
                  prefix={r: fix(p) for r, p in st.prefix.items()},
                  suffix={r: fix(s) for r, s in st.suffix.items()},
                  generation_prompt=fix(st.generation_prompt),
                  default_system=None if st.default_system is None else fix(st.default_system))
    if not out.bos and bos_text and out.preamble.startswith(bos_text):
        out = replace(out, bos=bos_text, preamble=out.preamble[len(bos_text):])
    return out


def simulate(st: ChatStructure, msgs: list[Message], *, include_bos: bool = True,
             strip_content: bool = False) -> str:
    """What the Go template written by ``go_template`` renders for ``msgs`` (Python replay).

    Messages of other roles render as nothing. ``strip_content`` replays a
    template that trims contents (Jinja ``| trim``), to tell that case apart.
    """
    out = [st.bos if include_bos else "", st.preamble]
    for i, m in enumerate(msgs):
        role, last = m["role"], i == len(msgs) - 1
        if i == 0 and role != "system" and st.default_system is not None:
            out.append(st.prefix["system"] + st.default_system + st.suffix["system"])
        if role not in ROLES:
            continue
        out.append(st.prefix[role] + (m["content"].strip() if strip_content else m["content"]))
        if not (last and role == "assistant"):
            out.append(st.suffix[role])
        if last and role != "assistant":
            out.append(st.generation_prompt)
    return "".join(out)


def _probe_conversations() -> list[list[Message]]:
    """Conversations (ending with a user turn) on which the structure must reproduce the Jinja render."""
    odd = [" padded both sides \n", "line one\nline two\n\n  indented", '{{ .Content }} {% raw %} "q" \\n `b`',
           "héllo — 你好 🙂", "x"]

    def conv(roles: str, offset: int) -> list[Message]:
        names = {"s": "system", "u": "user", "a": "assistant"}
        return [{"role": names[r], "content": odd[(offset + k) % len(odd)]} for k, r in enumerate(roles)]

    shapes = ["u", "su", "uau", "suau", "uauau", "suauau"]
    return [conv(shape, k) for k, shape in enumerate(shapes)] + [conv(shape, 2 + k) for k, shape in enumerate(shapes)]


def _continuations() -> list[list[Message]]:
    """Conversations ending with an assistant message (Ollama continues it)."""
    return [[{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Partial answer"}],
            [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Q1"},
             {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
             {"role": "assistant", "content": "Start of"}]]


def _verify(tok: "PreTrainedTokenizerBase", st: ChatStructure, allow_content_trim: bool) -> None:
    """Check ``st`` against the Jinja render (a template that only trims contents passes if allowed).

    Raises ValueError naming the first conversation that renders differently.
    """
    for msgs in _probe_conversations():
        want = _render(tok, msgs, gen=True)
        if simulate(st, msgs) == want:
            continue
        if simulate(st, msgs, strip_content=True) == want:
            if allow_content_trim:
                continue
            raise ValueError("the chat template strips whitespace around message contents (Jinja `| trim`), "
                             "which an Ollama Go template cannot do; pass allow_content_trim=True to accept "
                             "a template that keeps contents as they are")
        raise ValueError("the chat template is not expressible as per-role prefix/suffix text (it has logic "
                         f"beyond that); for roles {[m['role'] for m in msgs]} Jinja renders {want!r} but the "
                         f"derived structure renders {simulate(st, msgs)!r}")
    for msgs in _continuations():
        try:
            want = _render(tok, msgs, cont=True)
        except Exception:  # noqa: BLE001 - templates may refuse a final assistant message
            continue
        if simulate(st, msgs) != want:
            raise ValueError("the chat template does not continue a final assistant message as the derived "
                             f"structure does: Jinja renders {want!r}, structure {simulate(st, msgs)!r}")


def chat_structure(tokenizer: "PreTrainedTokenizerBase", *, allow_content_trim: bool = False) -> ChatStructure:
    """The tokenizer's chat template reduced to per-role text, verified against the Jinja render.

    Raises ValueError when the template is not expressible that way.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template")
    try:
        st = _unsentinel(_probe(tokenizer), tokenizer.bos_token or "", tokenizer.eos_token or "")
        _verify(tokenizer, st, allow_content_trim)
    except ValueError:
        raise
    except Exception as e:  # a Jinja raise_exception or a template error on the probe conversations
        raise ValueError(f"the chat template failed on a probe conversation: {e}") from e
    return st


def _adds_bos(tok: "PreTrainedTokenizerBase") -> bool:
    """Whether plain encoding prepends BOS, which is what a GGUF's ``add_bos_token`` records."""
    if tok.bos_token_id is None:
        return False
    ids = tok("a")["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id


def _go_string(s: str) -> str:
    """``s`` as a Go interpreted string literal whose text is all printable.

    Ollama's Modelfile parser silently drops non-printable runes inside a
    value, so every such character is written as an escape.
    """
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif not ch.isprintable():
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _lit(s: str) -> str:
    """A Go template action that prints ``s`` (nothing for an empty string)."""
    return "{{ " + _go_string(s) + " }}" if s else ""


def render_go_template(st: ChatStructure, *, include_bos: bool = True) -> str:
    """The Go template text for ``st``: one fixed shape iterating ``.Messages``.

    Layout newlines sit between actions and are removed by ``{{-`` markers;
    all template text is inside quoted constants, so nothing else is trimmed.
    """
    p, s = st.prefix, st.suffix
    start = (st.bos if include_bos else "") + st.preamble
    lines = [
        "{{- /* written by ray_qlora.export.ollama from the tokenizer's chat template */ -}}",
        *(["{{- " + _go_string(start) + " }}"] if start else []),
        "{{- range $i, $_ := .Messages }}",
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
    ]
    if st.default_system is not None:
        lines.append('{{- if and (eq $i 0) (ne .Role "system") }}'
                     + _lit(p["system"] + st.default_system + s["system"]) + "{{ end }}")
    lines += [
        '{{- if eq .Role "system" }}' + _lit(p["system"]) + "{{ .Content }}" + _lit(s["system"]),
        '{{- else if eq .Role "user" }}' + _lit(p["user"]) + "{{ .Content }}" + _lit(s["user"]),
        '{{- else if eq .Role "assistant" }}' + _lit(p["assistant"]) + "{{ .Content }}"
        + ("{{ if not $last }}" + _lit(s["assistant"]) + "{{ end }}" if s["assistant"] else ""),
        "{{- end }}",
    ]
    if st.generation_prompt:
        lines.append('{{- if and $last (ne .Role "assistant") }}' + _lit(st.generation_prompt) + "{{ end }}")
    lines.append("{{- end }}")
    return "\n".join(lines)


def go_template(tokenizer: "PreTrainedTokenizerBase", *, include_bos: bool | None = None,
                allow_content_trim: bool = False) -> str:
    """An Ollama TEMPLATE (Go text/template) rendering what the tokenizer's chat template renders.

    For conversations of system/user/assistant messages ending with a user
    turn, the result equals ``apply_chat_template(messages, tokenize=False,
    add_generation_prompt=True)``; a final assistant message is continued.

    ``include_bos``: whether the BOS text the Jinja template writes goes into
    the TEMPLATE. Ollama (and llama.cpp) prepend BOS themselves when the
    model's GGUF says ``add_bos_token``, and the GGUF converters set that when
    the tokenizer prepends BOS on plain encoding; writing it in the template
    too would give two BOS tokens. The default (None) therefore leaves it out
    exactly when the tokenizer adds BOS itself.

    Raises ValueError when the template cannot be expressed this way.
    """
    st = chat_structure(tokenizer, allow_content_trim=allow_content_trim)
    if include_bos is None:
        include_bos = not _adds_bos(tokenizer)
    return render_go_template(st, include_bos=include_bos)


def _special_token_texts(tok: "PreTrainedTokenizerBase") -> list[str]:
    """Texts of the special tokens, longest first (for scanning rendered text)."""
    texts = set(tok.all_special_tokens)
    texts |= {t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    return sorted((t for t in texts if t), key=len, reverse=True)


def _special_tokens_in(text: str, specials: list[str]) -> list[str]:
    """Special tokens written in ``text``, in order, matching the longest at each position."""
    found, i = [], 0
    while i < len(text):
        hit = next((t for t in specials if text.startswith(t, i)), None)
        if hit is None:
            i += 1
        else:
            found.append(hit)
            i += len(hit)
    return found


def stop_tokens(tokenizer: "PreTrainedTokenizerBase") -> list[str]:
    """Strings for ``PARAMETER stop``: the end-of-turn token(s) and eos, deduplicated.

    They are the special tokens the template writes between an assistant
    answer and the next user message: the one that closes the answer
    (``<|im_end|>``, ``<|eot_id|>``) and those that open a new turn
    (``<|im_start|>``, ``<|start_header_id|>``), so a model that forgets to
    close its answer still cannot write the user's next turn. The tokenizer's
    eos token is added too. Works for any template, expressible or not.
    """
    specials = _special_token_texts(tokenizer)
    found: list[str] = []
    try:
        u1, a1 = {"role": "user", "content": _USR1}, {"role": "assistant", "content": _AST1}
        text = _render(tokenizer, [u1, a1, {"role": "user", "content": _USR2}])
        between = text[text.index(_AST1) + len(_AST1): text.index(_USR2)]
        found = _special_tokens_in(between, specials)
    except Exception as e:  # noqa: BLE001 - no usable template: eos alone
        log.debug("stop tokens from the chat template failed: %s", e)
    if tokenizer.eos_token:
        found.append(tokenizer.eos_token)
    return list(dict.fromkeys(t for t in found if t))


def _triple_quoted(text: str, what: str) -> str:
    """``text`` as an Ollama Modelfile triple-quoted value.

    Ollama's parser takes everything between ``\"\"\"`` pairs verbatim (no
    escapes) and drops non-printable characters other than whitespace, so
    text containing ``\"\"\"`` or such characters cannot be written.
    """
    if '"""' in text:
        raise ValueError(f'{what} contains """, which an Ollama Modelfile value cannot hold')
    bad = sorted({repr(c) for c in text if not c.isprintable() and c not in "\n\r\t"})
    if bad:
        raise ValueError(f"{what} contains characters an Ollama Modelfile drops: {', '.join(bad)}")
    return '"""' + text + '"""'


def _quoted(value: str, what: str) -> str:
    """A one-line Modelfile value, double-quoted (Ollama strips the quotes, no escapes)."""
    if '"' in value or "\n" in value or "\r" in value:
        raise ValueError(f"{what} {value!r} cannot be written as a quoted Modelfile value")
    return f'"{value}"'


def _path_value(ref: str, what: str) -> str:
    """A FROM/ADAPTER argument: as is, or quoted when it has spaces."""
    if not ref or "\n" in ref or '"' in ref:
        raise ValueError(f"{what} {ref!r} is not a usable Modelfile path or model name")
    return _quoted(ref, what) if any(c.isspace() for c in ref) else ref


def _body(tokenizer: "PreTrainedTokenizerBase", *, num_ctx: int, temperature: float, repeat_penalty: float,
          system: str | None, include_bos: bool | None, allow_content_trim: bool,
          require_template: bool) -> list[str]:
    """The Modelfile lines after FROM/ADAPTER: TEMPLATE, stops, parameters, SYSTEM."""
    if num_ctx < 1:
        raise ValueError(f"num_ctx must be positive, got {num_ctx}")
    lines: list[str] = []
    try:
        template = go_template(tokenizer, include_bos=include_bos, allow_content_trim=allow_content_trim)
        lines.append("TEMPLATE " + _triple_quoted(template, "TEMPLATE"))
    except ValueError as e:
        if require_template:
            raise
        log.warning("Modelfile written without TEMPLATE (Ollama will guess one from the model): %s", e)
        lines.append("# No TEMPLATE: the chat template is not expressible as an Ollama Go template "
                     "(see ray_qlora.export.ollama); Ollama guesses one from the model's metadata.")
    lines += [f"PARAMETER stop {_quoted(t, 'stop token')}" for t in stop_tokens(tokenizer)]
    lines += [
        # Greedy by default: fine-tuned models are mostly used for strict-format
        # tasks (extraction, classification, JSON), where sampling only adds
        # format errors, and evaluation after training decodes greedily too.
        f"PARAMETER temperature {temperature:g}",
        # Ollama's default repeat_penalty (1.1) would change greedy outputs away
        # from what evaluation measured; 1 turns it off.
        f"PARAMETER repeat_penalty {repeat_penalty:g}",
        # Context window: what training used (data.max_seq_length) or more.
        f"PARAMETER num_ctx {int(num_ctx)}",
    ]
    if system is not None:
        lines.append("SYSTEM " + _triple_quoted(system, "SYSTEM"))
    return lines


def merged_modelfile(tokenizer: "PreTrainedTokenizerBase", *, from_ref: str = ".", num_ctx: int,
                     temperature: float = 0.0, repeat_penalty: float = 1.0, system: str | None = None,
                     include_bos: bool | None = None, allow_content_trim: bool = False,
                     require_template: bool = False) -> str:
    """A Modelfile for a merged model.

    ``from_ref`` is the merged folder (default ``.``: the Modelfile is written
    inside it, and Ollama resolves paths relative to the Modelfile) or a GGUF
    file name. ``system``, when given, becomes Ollama's SYSTEM, which Ollama
    sends as a system message whenever a request has none. A template that
    cannot be expressed is left out with a warning, unless ``require_template``.
    """
    lines = [f"FROM {_path_value(from_ref, 'FROM')}"]
    lines += _body(tokenizer, num_ctx=num_ctx, temperature=temperature, repeat_penalty=repeat_penalty,
                   system=system, include_bos=include_bos, allow_content_trim=allow_content_trim,
                   require_template=require_template)
    return "\n".join(lines) + "\n"


def adapter_modelfile(tokenizer: "PreTrainedTokenizerBase", *, base_ref: str, adapter_ref: str = ".",
                      num_ctx: int, temperature: float = 0.0, repeat_penalty: float = 1.0,
                      system: str | None = None, include_bos: bool | None = None,
                      allow_content_trim: bool = False, require_template: bool = False) -> str:
    """A Modelfile applying a LoRA adapter to a base model Ollama already has or can read.

    ``base_ref`` must be the very base the adapter was trained on (an Ollama
    model name, a folder or a GGUF file); ``adapter_ref`` is the adapter
    folder (default ``.``: the Modelfile is written inside it) or a GGUF
    adapter file. Other arguments as for ``merged_modelfile``.
    """
    lines = [f"FROM {_path_value(base_ref, 'FROM')}", f"ADAPTER {_path_value(adapter_ref, 'ADAPTER')}"]
    lines += _body(tokenizer, num_ctx=num_ctx, temperature=temperature, repeat_penalty=repeat_penalty,
                   system=system, include_bos=include_bos, allow_content_trim=allow_content_trim,
                   require_template=require_template)
    return "\n".join(lines) + "\n"


def write_modelfile(text: str, folder: Path) -> Path:
    """Write ``text`` as ``folder/Modelfile`` (the name ``ollama create`` looks for) and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "Modelfile"
    path.write_text(text, encoding="utf-8")
    return path
