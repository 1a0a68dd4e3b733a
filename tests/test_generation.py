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


def test_logprobs_are_the_models_own_for_each_answer_token(model) -> None:  # noqa: ANN001
    import math

    import torch

    from ray_qlora.generation import generate_text, stream_text

    tok, m = model
    out = generate_text(m, tok, ["Give 5 mg", "The dose is"], 8, 2, logprobs=3)
    for prompt, result in zip(["Give 5 mg", "The dose is"], out):
        entries = result["logprobs"]
        assert entries and "".join(e["token"] for e in entries).strip() == result["text"]
        # each entry is the model's log-probability of that token given the prompt and the tokens before it
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        for e in entries:
            with torch.inference_mode():
                logits = m(torch.tensor([ids])).logits[0, -1].float()
            expected = torch.log_softmax(logits, -1)
            token_id = int(expected.argmax())  # greedy: the token picked is the likeliest
            assert tok.decode([token_id]) == e["token"]
            assert math.isclose(e["logprob"], float(expected[token_id]), abs_tol=1e-4)
            assert [t for t, _ in e["top"]][0] == e["token"] and len(e["top"]) == 3
            assert [v for _, v in e["top"]] == sorted((v for _, v in e["top"]), reverse=True)
            ids.append(token_id)
    # streamed: the same entries, spread over the chunks that carry their text
    events = list(stream_text(m, tok, "Give 5 mg", 8, logprobs=3))
    streamed = [e for ev in events for e in ev.get("logprobs", [])]
    assert [e["token"] for e in streamed] == [e["token"] for e in out[0]["logprobs"]]
    assert all(math.isclose(a["logprob"], b["logprob"], abs_tol=1e-4) for a, b in zip(streamed, out[0]["logprobs"]))
    assert any(ev.get("logprobs") for ev in events if "text" in ev)  # not all held back to the end


def test_logprobs_stop_where_the_answer_is_cut(model) -> None:  # noqa: ANN001
    from ray_qlora.generation import generate_text, stream_text

    tok, m = model
    free = generate_text(m, tok, ["Give 5 mg"], 12, logprobs=0)[0]
    stop = free["text"][8:10]
    cut = generate_text(m, tok, ["Give 5 mg"], 12, 1, 0.0, 1.0, None, [stop], logprobs=0)[0]
    tokens = [e["token"] for e in cut["logprobs"]]
    # the tokens that make up the answer: none past it (the one holding the stop may straddle the cut)
    assert "".join(tokens).strip().startswith(cut["text"]) and len(tokens) < len(free["logprobs"])
    assert len("".join(tokens[:-1]).strip()) < len(cut["text"])  # the last one reported still holds answer text
    assert all(e["top"] == [] for e in cut["logprobs"])  # logprobs=0: no alternatives
    offsets = [e["offset"] for e in cut["logprobs"]]
    assert offsets == sorted(offsets) and all(o < len(cut["text"]) for o in offsets)
    events = list(stream_text(m, tok, "Give 5 mg", 12, stop=[stop], logprobs=0))
    assert [e["token"] for ev in events for e in ev.get("logprobs", [])] == tokens


def test_penalties_count_only_the_answers_tokens() -> None:
    import torch

    from ray_qlora.generation import TokenBias

    (penalties,) = TokenBias(presence_penalty=0.5, frequency_penalty=1.0).processors(prompt_len=2)
    ids = torch.tensor([[1, 2, 3, 3, 4]])  # prompt [1, 2], answer so far [3, 3, 4]
    out = penalties(ids, torch.zeros(1, 6))
    # token 3: twice in the answer (2 x 1.0 + 0.5); token 4: once; the prompt's 1 and 2 are not penalised
    assert out.tolist() == [[0.0, 0.0, 0.0, -2.5, -1.5, 0.0]]
    assert penalties(ids[:, :2], torch.zeros(1, 6)).tolist() == [[0.0] * 6]  # nothing generated yet
    assert TokenBias().processors(2) == []


def test_logit_bias_and_penalties_steer_the_answer(model) -> None:  # noqa: ANN001
    from ray_qlora.generation import TokenBias, generate_text, stream_text

    tok, m = model
    free = generate_text(m, tok, ["The dose is"], 12, logprobs=0)[0]
    first = tok(" " + free["text"].split()[0], add_special_tokens=False)["input_ids"][0]
    forced = tok(" mg", add_special_tokens=False)["input_ids"]
    assert len(forced) == 1
    bias = TokenBias(logit_bias=((forced[0], 100.0),))
    assert generate_text(m, tok, ["The dose is"], 4, bias=bias)[0]["text"] == "mg mg mg mg"
    banned = generate_text(m, tok, ["The dose is"], 4, bias=TokenBias(logit_bias=((first, -100.0),)),
                           logprobs=0)[0]
    assert banned["logprobs"][0]["token"] != free["logprobs"][0]["token"]
    # the tiny model repeats one word; a frequency penalty makes it move on
    assert len(set(free["text"].split())) == 1
    varied = generate_text(m, tok, ["The dose is"], 12, bias=TokenBias(frequency_penalty=2.0))[0]
    assert len(set(varied["text"].split())) > 1
    streamed = list(stream_text(m, tok, "The dose is", 12, bias=TokenBias(frequency_penalty=2.0)))
    assert "".join(e.get("text", "") for e in streamed) == varied["text"]
