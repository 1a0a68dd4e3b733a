"""Pre-flight checks: each one trips on an example made to trip it, and passes on SmolLM2's real template."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_qlora.data.checks import collator_keeps_eot_label, tokenizer_checks
from ray_qlora.data.templating import (CHECK_EOT_LABELLED, CHECK_LABELS_NONEMPTY, CHECK_PROMPT_PREFIX,
                                       end_of_turn_id, set_chat_template, tokenize_conversation)
from ray_qlora.config import parse_config
from ray_qlora.errors import DataError
from ray_qlora.modeling import load_tokenizer

CHAT = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]


@pytest.fixture()
def tok(tokenizer_dir: Path):  # noqa: ANN201
    return load_tokenizer(tokenizer_dir)


def test_real_template_passes_every_row_check(tok) -> None:  # noqa: ANN001
    assert tokenize_conversation(tok, CHAT, 128)["check_failures"] == []
    assert tok.convert_ids_to_tokens(end_of_turn_id(tok)) == "<|im_end|>"


def test_template_without_end_of_turn_token_trips_its_check(tok) -> None:  # noqa: ANN001
    set_chat_template(tok, "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
                           "{% if add_generation_prompt %}assistant:\n{% endif %}")
    assert tokenize_conversation(tok, CHAT, 128)["check_failures"] == [CHECK_EOT_LABELLED]


def test_inference_prompt_not_a_prefix_trips_its_check(tok) -> None:  # noqa: ANN001
    # training renders the answer under "bot", the server would prompt with "assistant"
    set_chat_template(tok, "{% for m in messages %}<|im_start|>{{ 'bot' if m['role'] == 'assistant' else m['role'] }}"
                           "\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert CHECK_PROMPT_PREFIX in tokenize_conversation(tok, CHAT, 128)["check_failures"]


def test_template_that_drops_answers_trips_the_empty_label_check(tok) -> None:  # noqa: ANN001
    set_chat_template(tok, "{% for m in messages %}{% if m['role'] != 'assistant' %}<|im_start|>{{ m['role'] }}\n"
                           "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}")
    assert CHECK_LABELS_NONEMPTY in tokenize_conversation(tok, CHAT, 128)["check_failures"]


def test_collator_that_masks_pad_is_caught(tok) -> None:  # noqa: ANN001
    from transformers import DataCollatorForLanguageModeling

    eot = end_of_turn_id(tok)
    tok.pad_token = tok.convert_ids_to_tokens(eot)  # pad == end of turn, as in many chat tokenizers
    assert collator_keeps_eot_label(tok, eot)  # TRL's collator, which training uses, keeps it
    # transformers' LM collator derives labels from input_ids and masks every pad: the bug this check is for
    lm = DataCollatorForLanguageModeling(tok, mlm=False)
    assert not collator_keeps_eot_label(tok, eot, lambda rows: lm([{"input_ids": r["input_ids"]} for r in rows]))


def test_missing_chat_template_names_the_key(tmp_path: Path, tokenizer_dir: Path) -> None:
    import json
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tokenizer_dir, bare)
    conf = json.loads((bare / "tokenizer_config.json").read_text())
    conf.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(conf))
    for extra in bare.glob("chat_template.*"):
        extra.unlink()
    cfg = parse_config({"run": {"output_uri": str(tmp_path)}, "data": {"input_uris": ["x"]}})
    with pytest.raises(DataError, match="data.chat_template"):
        tokenizer_checks(bare, cfg)
    named = tokenizer_checks(bare, cfg.with_overrides({"data.chat_template": "chatml"}))[1]()
    assert named["chat_template"]["source"] == "data.chat_template"
    assert named["end_of_turn_token"] == "<|im_end|>"
    with pytest.raises(DataError, match="lacks"):
        tokenizer_checks(bare, cfg.with_overrides({"data.chat_template": "llama-3"}))


def test_plain_text_is_labelled_throughout_and_ends_with_eos(tok) -> None:  # noqa: ANN001
    out = tokenize_conversation(tok, [{"role": "text", "content": "A document about dosing."}], 128)
    assert out["labels"] == out["input_ids"] and out["input_ids"][-1] == tok.eos_token_id
    assert out["check_failures"] == []
