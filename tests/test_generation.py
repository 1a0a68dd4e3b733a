"""Stop sequences apply to the completion alone, streamed or not (tiny model, no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):  # noqa: ANN201
    from ray_qlora.modeling import load_16bit, load_tokenizer

    return load_tokenizer(tiny_model_dir), load_16bit(tiny_model_dir, "float32", "cpu")


def test_a_stop_sequence_starting_in_the_prompt_does_not_end_the_answer(model) -> None:  # noqa: ANN001
    from ray_qlora.generation import generate_text

    tok, m = model
    free = generate_text(m, tok, ["The dose is"], 12)[0]
    assert free["text"].startswith("is") and free["completion_tokens"] == 12  # the tiny model repeats " is"
    # "dose is i" only exists across the prompt's end; transformers' stop_strings stopped after one token here
    spanning = generate_text(m, tok, ["The dose is"], 12, 1, 0.0, 1.0, None, ["dose is i"])[0]
    assert spanning == free


def test_stop_sequences_cut_the_answer_and_end_generation_early(model) -> None:  # noqa: ANN001
    from ray_qlora.generation import cut_at_stop, generate_text, stream_text

    tok, m = model
    free = generate_text(m, tok, ["Give 5 mg"], 12)[0]["text"]
    stop = free[8:10]
    expected = cut_at_stop(free, [stop])[0].strip()
    cut = generate_text(m, tok, ["Give 5 mg"], 12, 1, 0.0, 1.0, None, [stop])[0]
    assert cut["text"] == expected and cut["finish_reason"] == "stop" and cut["completion_tokens"] < 12
    events = list(stream_text(m, tok, "Give 5 mg", 12, stop=[stop]))
    assert "".join(e.get("text", "") for e in events) == expected
    assert events[-1]["finish_reason"] == "stop" and events[-1]["completion_tokens"] == cut["completion_tokens"]
    # without a stop, streamed and whole answers are the same text
    events = list(stream_text(m, tok, "Give 5 mg", 12))
    assert "".join(e.get("text", "") for e in events) == free and events[-1]["completion_tokens"] == 12
