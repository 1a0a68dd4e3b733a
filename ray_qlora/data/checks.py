"""Pre-flight checks: the silent training bugs, caught before any training.

A model trained on wrong labels still trains; its loss even goes down. These
checks look for the ways that happens and stop the stage, naming the check
and example rows, instead of letting a run burn GPU hours:

- per row (computed in the row actors by data/templating.py):
  ``end_of_turn_labelled`` (each assistant turn's end-of-turn token carries a
  label, or the model never learns to stop), ``generation_prompt_is_prefix``
  (the prompt the server builds at inference is a prefix of the
  training render, or serving sends text training never showed),
  ``label_mask_nonempty`` (an example with nothing to learn from);
- per tokenizer: ``chat_template`` (the tokenizer has one, or the config
  names one), ``pad_vs_eos`` (when pad is the end-of-turn token, the collator
  training uses must keep that token's labels).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ray_qlora.config import PipelineConfig
from ray_qlora.data.templating import (CHECK_EOT_LABELLED, CHECK_LABELS_NONEMPTY, CHECK_PROMPT_PREFIX,
                                       IGNORE_INDEX, end_of_turn_id, uses_tool_front)
from ray_qlora.errors import DataError

if TYPE_CHECKING:
    import ray.data
    from transformers import PreTrainedTokenizerBase

__all__ = ["ROW_CHECKS", "collator_keeps_eot_label", "row_checks", "tokenizer_checks"]

ROW_CHECKS = {
    CHECK_EOT_LABELLED: "the chat template writes no end-of-turn token after an assistant answer",
    CHECK_PROMPT_PREFIX: "the inference prompt (chat template with add_generation_prompt) is not a prefix of "
                         "the training render; pick a prefix-stable template with data.chat_template",
    CHECK_LABELS_NONEMPTY: "no token of the example carries a label",
}


def collator_keeps_eot_label(tok: "PreTrainedTokenizerBase", eot: int,
                             collate: Callable[[list[dict[str, Any]]], Any] | None = None) -> bool:
    """Does the collator (by default the one SFTTrainer builds) keep the label of an end-of-turn token?

    A collator that derives labels by masking pad tokens would erase every
    end-of-turn label when pad == eos; TRL's pads labels separately.
    """
    if collate is None:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        collate = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)
    batch = collate([{"input_ids": [7, eot], "labels": [IGNORE_INDEX, eot]},
                     {"input_ids": [7], "labels": [IGNORE_INDEX]}])
    return int(batch["labels"][0, 1]) == eot


def tokenizer_checks(base: Path, cfg: PipelineConfig) -> tuple["PreTrainedTokenizerBase", Callable[[], dict[str, Any]]]:
    """Checks on the tokenizer alone; raises DataError naming the failed one.

    Returns the checked tokenizer (the row actors get this very object) and a
    function giving every result. The template checks run now. The collator
    check needs TRL, whose import takes seconds, so it runs in a thread while
    Ray processes the rows; the returned function waits for it (or raises).
    """
    from ray_qlora.modeling import load_tokenizer

    try:
        tok = load_tokenizer(base, cfg.data.chat_template, trust_remote_code=cfg.model.trust_remote_code)
    except ValueError as err:
        raise DataError(f"pre-flight check 'chat_template' failed: {err}") from None
    eot = end_of_turn_id(tok)
    out: dict[str, Any] = {
        "chat_template": {"passed": True, "source": cfg.data.chat_template and "data.chat_template" or "tokenizer"},
        "end_of_turn_token": tok.convert_ids_to_tokens(eot),
        # how tool calls and results are written (see data/templating.py)
        "tool_use": "hermes tags (tool front)" if uses_tool_front(tok) else "chat template",
    }
    same = tok.pad_token_id == eot
    pool = ThreadPoolExecutor(max_workers=1)
    kept = pool.submit(collator_keeps_eot_label, tok, eot) if same else None
    pool.shutdown(wait=False)

    def result() -> dict[str, Any]:
        if kept is not None and not kept.result():  # result() re-raises anything the check raised
            raise DataError("pre-flight check 'pad_vs_eos' failed: pad is the end-of-turn token and the training "
                            "collator drops its labels; give the tokenizer a distinct pad token")
        return {**out, "pad_vs_eos": {"passed": True, "pad_is_end_of_turn": same}}

    return tok, result


def row_checks(processed: "ray.data.Dataset") -> dict[str, Any]:
    """Counts of rows failing each per-row check; raises DataError naming checks and example rows."""
    from ray.data.expressions import col

    # Projected first: filtering whole rows would copy every token list only to count a few.
    failing = processed.select_columns(["check_failed", "path", "line", "check_failures"]).filter(
        expr=col("check_failed"))
    n = failing.count()
    if n:
        sample = failing.take(10)
        names = sorted({c for r in sample for c in r["check_failures"]})
        where = ", ".join(f"{r['path']} line {r['line']}" for r in sample[:5])
        why = "; ".join(f"{c}: {ROW_CHECKS[c]}" for c in names)
        raise DataError(f"pre-flight check(s) {names} failed on {n} example(s), e.g. {where}. {why}")
    return {name: {"passed": True, "failures": 0} for name in ROW_CHECKS}
