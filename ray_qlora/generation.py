"""Chat generation shared by merge (verification), evaluate and serve."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterator

from ray_qlora import storage
from ray_qlora.config import PipelineConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["Prompt", "StopScanner", "cut_at_stop", "eval_prompts", "generate", "generate_text", "inference_dtype",
           "render", "stream_text"]

Prompt = tuple[list[dict[str, str]], str]  # (messages before the answer, reference answer)


def inference_dtype(saved: str, device: str) -> str:
    """The dtype to run a saved model in: its own on GPU, float32 on CPU (bf16 is emulated there)."""
    return saved if device.startswith("cuda") else "float32"


def eval_prompts(cfg: PipelineConfig, run: storage.RunPaths, limit: int) -> list[Prompt]:
    """The first ``limit`` held-out conversations, split into prompt and reference answer."""
    import pyarrow.dataset as pads

    fs, path = storage.resolve(run.eval, cfg.storage)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["messages", "content_hash"])
    rows = sorted(table.to_pylist(), key=lambda r: r["content_hash"])  # stable order across runs
    out = []
    for r in rows[:limit]:
        msgs = json.loads(r["messages"])
        out.append((msgs[:-1], msgs[-1]["content"]))
    return out


def render(tok: "PreTrainedTokenizerBase", conversation: list[dict[str, str]]) -> str:
    """The prompt text of a conversation: its chat template with the assistant's turn opened."""
    return tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop sequence (excluded, as OpenAI does), and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class StopScanner:
    """Stop sequences in streamed text: hands out only text that cannot be the start of a stop sequence."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.buffer = stops, ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop sequence ended the answer)."""
        self.buffer += text
        cut, stopped = cut_at_stop(self.buffer, self.stops)
        if stopped:
            self.buffer = ""
            return cut.rstrip(), True
        # hold back a tail that is a prefix of some stop sequence (the next piece may complete it),
        # and trailing whitespace (the answer's end is stripped, as in the non-streamed text)
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.buffer.endswith(s[:k])), default=0)
        out = self.buffer[:len(self.buffer) - keep].rstrip()
        self.buffer = self.buffer[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


def _stop_criteria(tok: "PreTrainedTokenizerBase", stop: list[str], prompt_len: int) -> Any:
    """Stop each row once its *generated* text holds a stop sequence.

    transformers' own ``stop_strings`` also matches a stop sequence that
    starts in the prompt, ending answers after one token; OpenAI's stop
    applies to the completion alone.
    """
    import torch
    from transformers import StoppingCriteria

    class _StopInCompletion(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:  # noqa: ANN401
            texts = tok.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=True)
            # matched on the answer as the client gets it: without its leading whitespace
            return torch.tensor([any(s in t.lstrip() for s in stop) for t in texts], dtype=torch.bool,
                                device=input_ids.device)

    return _StopInCompletion()


def _sampling(tok: "PreTrainedTokenizerBase", max_new_tokens: int, temperature: float, top_p: float,
              seed: int | None, stop: list[str] | None, prompt_len: int = 0, extra: list[Any] | None = None,
              grammar: Any = None) -> dict[str, Any]:
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id,
                              "eos_token_id": tok.eos_token_id}
    criteria = list(extra or [])
    if stop:  # stop generating as soon as a stop sequence is out (the text is cut after decoding)
        criteria.append(_stop_criteria(tok, list(stop), prompt_len))
    if criteria:
        kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
    if grammar is not None:  # an xgrammar CompiledGrammar (response_format, eval.constrained)
        from xgrammar.contrib.hf import LogitsProcessor  # single-use: one per generate call

        kwargs["logits_processor"] = LogitsProcessorList([LogitsProcessor(grammar)])
    if temperature > 0:
        if seed is not None:
            torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def generate(model: "PreTrainedModel", tok: "PreTrainedTokenizerBase", conversations: list[list[dict[str, str]]],
             max_new_tokens: int, batch_size: int = 8, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, stop: list[str] | None = None, grammar: Any = None
             ) -> list[dict[str, Any]]:
    """Batched chat completion; greedy when temperature is 0.

    Returns per conversation {text, prompt_tokens, completion_tokens, finish_reason}.
    """
    return generate_text(model, tok, [render(tok, c) for c in conversations], max_new_tokens, batch_size,
                         temperature, top_p, seed, stop, grammar)


def generate_text(model: "PreTrainedModel", tok: "PreTrainedTokenizerBase", prompts: list[str],
                  max_new_tokens: int, batch_size: int = 8, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int | None = None, stop: list[str] | None = None, grammar: Any = None
                  ) -> list[dict[str, Any]]:
    """Batched completion of raw prompt texts (what ``generate`` does after the chat template).

    ``grammar``: a compiled xgrammar grammar every row's answer must follow (see ray_qlora.structured).
    """
    import torch

    tok.padding_side = "left"  # decoder-only: pad on the left so every row ends at the prompt
    eot = tok.eos_token_id
    results = []
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                  add_special_tokens=False).to(model.device)
        prompt_len = enc["input_ids"].shape[1]
        with torch.inference_mode():
            out = model.generate(**enc, **_sampling(tok, max_new_tokens, temperature, top_p, seed, stop, prompt_len,
                                                    grammar=grammar))
        for row, mask in zip(out, enc["attention_mask"]):
            new = row[prompt_len:].tolist()
            finished = eot in new
            if finished:
                new = new[:new.index(eot)]
            text, stopped = cut_at_stop(tok.decode(new, skip_special_tokens=True).lstrip(), stop or [])
            results.append({"text": text.strip(), "prompt_tokens": int(mask.sum()),
                            "completion_tokens": len(new) + int(finished),
                            "finish_reason": "stop" if finished or stopped else "length"})
    return results


def stream_text(model: "PreTrainedModel", tok: "PreTrainedTokenizerBase", prompt: str, max_new_tokens: int,
                temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                stop: list[str] | None = None, grammar: Any = None) -> Iterator[dict[str, Any]]:
    """One completion, piece by piece: {"text": ...} events, then a last {finish_reason, usage counts}.

    Generation runs in a thread feeding a streamer; a stop sequence ends it
    early (the consumer sets a flag the stopping criterion reads).
    """
    import threading

    import torch
    from transformers import StoppingCriteria, TextIteratorStreamer

    cancel = threading.Event()

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> bool:  # noqa: ANN401
            return cancel.is_set()

    enc = tok([prompt], return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    result: dict[str, Any] = {}

    def run() -> None:
        with torch.inference_mode():
            result["ids"] = model.generate(**enc, streamer=streamer,
                                           **_sampling(tok, max_new_tokens, temperature, top_p, seed, stop,
                                                       enc["input_ids"].shape[1], [_Cancelled()], grammar))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    scanner, stopped, started = StopScanner(stop or []), False, False
    try:
        for piece in streamer:
            if stopped:
                continue  # drain what the thread still produces
            if not started:  # the answer's leading whitespace goes, as in the non-streamed text
                piece = piece.lstrip()
                started = bool(piece)
            text, stopped = scanner.feed(piece)
            if stopped:
                cancel.set()
            if text:
                yield {"text": text}
        if not stopped:
            tail = scanner.flush().rstrip()
            if tail:
                yield {"text": tail}
    finally:
        cancel.set()
        worker.join()
    new = result["ids"][0, enc["input_ids"].shape[1]:].tolist() if "ids" in result else []
    eos = tok.eos_token_id in new
    n = new.index(tok.eos_token_id) + 1 if eos else len(new)
    yield {"finish_reason": "stop" if eos or stopped else "length",
           "prompt_tokens": int(enc["input_ids"].shape[1]), "completion_tokens": n}
