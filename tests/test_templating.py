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
