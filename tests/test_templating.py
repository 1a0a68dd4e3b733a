"""Labels sit on assistant tokens and their end-of-turn token, nowhere else."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_qlora.data.formats import RowError
from ray_qlora.data.templating import IGNORE_INDEX, tokenize_conversation, tokenize_conversations
from ray_qlora.modeling import load_tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path):  # noqa: ANN201
    return load_tokenizer(tokenizer_dir)


def _labelled_text(tok, out: dict) -> list[str]:  # noqa: ANN001
    """Decode each contiguous run of labelled tokens."""
    runs, cur = [], []
    for tid, lab in zip(out["input_ids"], out["labels"]):
        if lab != IGNORE_INDEX:
            assert lab == tid, "a label must equal its input token (shift happens in the loss)"
            cur.append(tid)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_single_turn_labels_answer_and_end_of_turn(tok) -> None:  # noqa: ANN001
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "It is 4."}]
    out = tokenize_conversation(tok, msgs, max_len=256)
    assert _labelled_text(tok, out) == ["It is 4.<|im_end|>"]
    # the newline the template writes after <|im_end|> is not learned
    last_labelled = max(i for i, lab in enumerate(out["labels"]) if lab != IGNORE_INDEX)
    assert out["input_ids"][last_labelled] == tok.eos_token_id
    assert out["num_label_tokens"] == sum(lab != IGNORE_INDEX for lab in out["labels"])


def test_multi_turn_labels_every_assistant_turn_only(tok) -> None:  # noqa: ANN001
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]
    out = tokenize_conversation(tok, msgs, max_len=256)
    assert _labelled_text(tok, out) == ["Hello!<|im_end|>", "Goodbye.<|im_end|>"]
    text = tok.decode(out["input_ids"])
    assert "Hi" in text and "Bye" in text  # user turns present in the input, just not labelled


def test_too_long_is_quarantined_or_truncated(tok) -> None:  # noqa: ANN001
    msgs = [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok " * 50}]
    with pytest.raises(RowError, match="too long"):
        tokenize_conversation(tok, msgs, max_len=64)
    out = tokenize_conversation(tok, msgs, max_len=100, policy="truncate")
    assert out["num_tokens"] == 100 and len(out["labels"]) == 100
    assert out["num_label_tokens"] > 0


def test_truncation_that_removes_every_answer_token_fails(tok) -> None:  # noqa: ANN001
    msgs = [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(RowError, match="no assistant tokens"):
        tokenize_conversation(tok, msgs, max_len=32, policy="truncate")


def test_inference_prompt_tokens_are_a_prefix_of_the_training_ids(tok) -> None:  # noqa: ANN001
    # the server tokenizes the rendered prompt as one string; training must start with exactly those ids
    history = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Order: 5 mg daily"}]
    msgs = [*history, {"role": "assistant", "content": '{"dose": "5 mg"}'}]
    prompt = tok(tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    out = tokenize_conversation(tok, msgs, max_len=256)
    assert out["input_ids"][:len(prompt)] == prompt
    assert all(lab == IGNORE_INDEX for lab in out["labels"][:len(prompt)])
    assert out["labels"][len(prompt)] != IGNORE_INDEX  # the answer's first token is learned


def test_a_batch_gives_what_each_row_gives_alone(tok) -> None:  # noqa: ANN001
    convs = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        [{"role": "text", "content": "A document about dosing."}],
        [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}],  # too long
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}],
    ]
    batch = tokenize_conversations(tok, convs, max_len=64)
    assert isinstance(batch[2], RowError) and "too long" in str(batch[2])
    for msgs, got in zip(convs, batch):
        if isinstance(got, RowError):
            continue
        assert got == tokenize_conversation(tok, msgs, max_len=64)
    assert _labelled_text(tok, batch[3]) == ["Hello!<|im_end|>", "Goodbye.<|im_end|>"]
    assert batch[1]["num_label_tokens"] == batch[1]["num_tokens"]  # plain text: every token learned


# Tool use: the conversation the server renders for a request is the one training labelled.
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": CITY}}
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "4 C, rain"},
    {"role": "assistant", "content": "4 C and rain."},
]


def test_a_template_without_tool_use_gets_the_tool_front_and_plain_chats_render_unchanged(
        tokenizer_dir: Path, tok) -> None:  # noqa: ANN001
    from transformers import AutoTokenizer

    from ray_qlora.data.templating import TOOL_USE_TEMPLATE, writes_tool_use

    raw = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert not writes_tool_use(raw)  # SmolLM2's template drops calls and results
    assert tok.chat_template == TOOL_USE_TEMPLATE + raw.chat_template and writes_tool_use(tok)
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    for msgs, gen in ((chat, False), (chat[1:], False), (chat[:2], True), (chat[1:2], True)):
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == \
            raw.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    again = load_tokenizer(tokenizer_dir, tok.chat_template)  # a saved model's template is not wrapped twice
    assert again.chat_template == tok.chat_template


def test_a_template_that_writes_tool_use_is_kept_as_it_is(tokenizer_dir: Path) -> None:
    own = ("{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
           "{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% else %}{{ m.content }}{% endif %}<|im_end|>\n"
           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert load_tokenizer(tokenizer_dir, own).chat_template == own


def test_tool_use_labels_the_calls_and_answers_not_the_tools_or_results(tok) -> None:  # noqa: ANN001
    out = tokenize_conversation(tok, TOOL_CHAT, max_len=512, tools=[WEATHER])
    assert out["check_failures"] == []
    assert _labelled_text(tok, out) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
        "4 C and rain.<|im_end|>"]
    text = tok.decode(out["input_ids"])
    assert '"name": "get_weather", "description": "Weather in a city"' in text  # the tools are in the prompt
    assert "<|im_start|>user\n<tool_response>\n4 C, rain\n</tool_response><|im_end|>" in text
    without = tokenize_conversation(tok, TOOL_CHAT, max_len=512)  # a row without tools: calls, no tool list
    assert "get_weather" in tok.decode(without["input_ids"]) and "<tools>" not in tok.decode(without["input_ids"])


def test_the_server_prompts_a_tool_conversation_with_the_tokens_training_saw(tok) -> None:  # noqa: ANN001
    from ray_qlora.generation import render
    from ray_qlora.serve.api import ChatCompletionRequest
    from ray_qlora.serve.tools import read_calls

    out = tokenize_conversation(tok, TOOL_CHAT, max_len=512, tools=[WEATHER])
    # the request a client sends after running the call: arguments as JSON text, as OpenAI's API has them;
    # 'strict' (how the call is decoded) is not shown to the model, which training never saw either
    strict = {**WEATHER, "function": {**WEATHER["function"], "strict": True}}
    req = ChatCompletionRequest(model="m", tools=[strict], messages=[
        TOOL_CHAT[0],
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        TOOL_CHAT[2]])
    for upto, turn in ((1, 0), (3, 1)):  # the prompt of the call, then of the final answer
        sent = req.conversation()[:upto]
        prompt = tok(render(tok, sent, req.template_tools()), add_special_tokens=False)["input_ids"]
        assert out["input_ids"][:len(prompt)] == prompt
        assert out["labels"][len(prompt) - 1] == IGNORE_INDEX and out["labels"][len(prompt)] != IGNORE_INDEX
    # and the call the model learned to write reads back as the call it was trained on
    learned = _labelled_text(tok, out)[0].removesuffix("<|im_end|>")
    calls = read_calls({"text": learned, "finish_reason": "stop"}, "auto", tok=tok,
                       functions=[WEATHER["function"]])["tool_calls"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("get_weather", '{"city": "Oslo"}')]


def test_the_tool_sample_trains_calls_and_text_answers_with_two_rows_quarantined(tok) -> None:  # noqa: ANN001
    import json

    from ray_qlora.data.formats import normalize_row
    from ray_qlora.data.sample import PLACE_ORDER, TOOL_SYSTEM_PROMPT, tool_sample_files

    examples, reasons = [], []
    for data in tool_sample_files(n=40).values():
        for line in data.decode().splitlines():
            try:
                examples.append(normalize_row(json.loads(line), system_prompt=TOOL_SYSTEM_PROMPT))
            except RowError as err:
                reasons.append(str(err))
    assert len(examples) == 40 and len(reasons) == 2
    assert "'cancel_order', which the row's tools do not define" in reasons[0] and "is not JSON" in reasons[1]
    assert all(e.tools == [PLACE_ORDER] for e in examples)
    last = [e.messages[-1] for e in examples]
    assert sum("tool_calls" in m for m in last) == 16 and sum(m["content"].startswith("Placed RX-") for m in last) == 16
    out = tokenize_conversations(tok, [e.messages for e in examples], 512, tools=[e.tools for e in examples])
    assert all(not isinstance(o, RowError) and o["check_failures"] == [] for o in out)


def test_a_conversation_the_template_refuses_is_quarantined_not_a_crash(tokenizer_dir: Path) -> None:
    # a template with a rule of its own, as Mistral's refuses call ids that are not 9 characters
    strict = ("{{ tools | tojson if tools }}{% for m in messages %}{% if m.tool_calls and m.tool_calls[0].id | length != 9 %}"
              "{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{% endif %}"
              "<|im_start|>{{ m.role }}\n{{ m.content }}{{ m.tool_calls | tojson if m.tool_calls }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    strict_tok = load_tokenizer(tokenizer_dir, strict)
    assert strict_tok.chat_template == strict  # it writes tool use itself: no tool front
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {}}}]}
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    out = tokenize_conversations(strict_tok, [[TOOL_CHAT[0], call], good], max_len=128)
    assert isinstance(out[0], RowError) and "refuses this conversation: Tool call IDs" in str(out[0])
    assert _labelled_text(strict_tok, out[1]) == ["Hello!<|im_end|>"]  # the rows beside it are unaffected


def test_named_templates_each_get_the_tool_front_only_where_they_need_it(tokenizer_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from ray_qlora.data.templating import TOOL_USE_TEMPLATE, uses_tool_front

    raw = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    own = ("{{ tools | tojson if tools }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
           "{{ m.tool_calls | tojson if m.tool_calls }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    raw.chat_template = {"default": raw.chat_template, "tool_use": own}  # as some tokenizers ship them
    raw.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template == {"default": TOOL_USE_TEMPLATE + raw.chat_template["default"], "tool_use": own}
    assert uses_tool_front(tok) and not uses_tool_front(load_tokenizer(tmp_path, own))
