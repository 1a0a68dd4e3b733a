"""Chat generation shared by merge (verification), evaluate and serve."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from ray_qlora import storage
from ray_qlora.config import PipelineConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["Prompt", "StopScanner", "TokenBias", "cut_at_stop", "eval_prompts", "generate", "generate_text", "inference_dtype",
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


def render(tok: "PreTrainedTokenizerBase", conversation: list[dict[str, Any]],
           tools: list[dict[str, Any]] | None = None) -> str:
    """The prompt text of a conversation: its chat template with the assistant's turn opened.

    ``tools``: OpenAI-style function tools, for templates that show them to the model (others ignore them).
    """
    return tok.apply_chat_template(conversation, tools=tools, tokenize=False, add_generation_prompt=True)


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


class _Logprobs:
    """A logits processor that keeps each row's log-probability of every token it generates.

    Placed first among the request's processors, it sees the model's own
    distribution: after the generation config's processors, before
    temperature, top_p and a grammar's mask (what vLLM calls raw logprobs),
    so a constrained answer still shows how sure the model was. The token
    picked at one step is only known at the next call (or, for the last
    step, from the finished sequences), so each step settles the one before.
    """

    def __init__(self, top: int) -> None:
        self.top = top
        self.ids: list[list[int]] = []  # per settled step: the token each row got
        self.chosen: list[list[float]] = []  # per settled step: that token's log-probability
        self.tops: list[tuple[list[list[float]], list[list[int]]]] = []  # per step: top-k values, ids
        self._last: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:  # noqa: ANN401
        import torch

        if self._last is not None:
            self._settle(input_ids[:, -1])
        self._last = torch.log_softmax(scores.float(), dim=-1)
        if self.top:
            values, ids = self._last.topk(self.top, dim=-1)
            self.tops.append((values.tolist(), ids.tolist()))
        return scores

    def _settle(self, picked: Any) -> None:  # noqa: ANN401
        lp = self._last.gather(1, picked[:, None]).squeeze(1).tolist()
        self.ids.append(picked.tolist())
        self.chosen.append(lp)  # appended last: a reader that sees it sees the id too
        self._last = None

    def finish(self, sequences: Any) -> None:  # noqa: ANN401
        """Settle the last step from the finished sequences (its token was never fed back)."""
        if self._last is not None:
            self._settle(sequences[:, -1])

    def row(self, r: int, upto: int | None = None) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """(token, log-probability, top alternatives) for row ``r``'s settled steps."""
        n = len(self.chosen) if upto is None else min(upto, len(self.chosen))
        return [(self.ids[t][r], self.chosen[t][r],
                 list(zip(self.tops[t][1][r], self.tops[t][0][r])) if self.top else []) for t in range(n)]


class _Offsets:
    """Where each generated token's text starts in the answer a client reads (leading whitespace dropped)."""

    def __init__(self, tok: "PreTrainedTokenizerBase") -> None:
        self.tok, self.starts = tok, [0]

    def covered(self, ids: list[int], answer_chars: int) -> list[int]:
        """Offsets of the tokens that hold part of the answer's first ``answer_chars`` characters."""
        while len(self.starts) <= len(ids):  # decoded once per prefix: a token's text depends on its neighbours
            self.starts.append(len(self.tok.decode(ids[:len(self.starts)], skip_special_tokens=True)))
        full = self.tok.decode(ids, skip_special_tokens=True)
        lead = len(full) - len(full.lstrip())
        return [max(0, s - lead) for s in self.starts[:len(ids)] if s - lead < answer_chars]


def _token_logprobs(tok: "PreTrainedTokenizerBase", steps: list[tuple[int, float, list[tuple[int, float]]]],
                    offsets: list[int]) -> list[dict[str, Any]]:
    """One entry per answer token: its text, log-probability, offset in the answer, top alternatives."""
    def piece(i: int) -> str:
        return tok.decode([i])

    return [{"token": piece(i), "logprob": lp, "offset": off,
             "top": [(piece(j), v) for j, v in alternatives]}
            for (i, lp, alternatives), off in zip(steps, offsets)]


@dataclass(frozen=True)
class TokenBias:
    """OpenAI's per-request nudges to the next token's scores: ``logit_bias`` and the two penalties.

    Frozen and hashable: the server batches together requests that share it.
    """

    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), -100 to 100
    presence_penalty: float = 0.0  # taken off every token already in the answer once
    frequency_penalty: float = 0.0  # taken off per time a token is already in the answer

    def processors(self, prompt_len: int) -> list[Any]:
        """The logits processors that apply it; none when it asks for nothing."""
        out: list[Any] = []
        if self.logit_bias:
            from transformers import SequenceBiasLogitsProcessor

            out.append(SequenceBiasLogitsProcessor([[[i], b] for i, b in self.logit_bias]))
        if self.presence_penalty or self.frequency_penalty:
            out.append(_Penalties(self.presence_penalty, self.frequency_penalty, prompt_len))
        return out


class _Penalties:
    """Presence and frequency penalties over the tokens generated so far, not the prompt's (as OpenAI and vLLM).

    transformers' own repetition_penalty scales logits and counts the prompt too: another knob.
    """

    def __init__(self, presence: float, frequency: float, prompt_len: int) -> None:
        self.presence, self.frequency, self.prompt_len = presence, frequency, prompt_len

    def __call__(self, input_ids: Any, scores: Any) -> Any:  # noqa: ANN401
        import torch

        answer = input_ids[:, self.prompt_len:]
        if answer.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, answer, torch.ones_like(answer, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def _sampling(tok: "PreTrainedTokenizerBase", max_new_tokens: int, temperature: float, top_p: float,
              seed: int | None, stop: list[str] | None, prompt_len: int = 0, extra: list[Any] | None = None,
              grammar: Any = None, recorder: _Logprobs | None = None, bias: TokenBias | None = None
              ) -> dict[str, Any]:
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id,
                              "eos_token_id": tok.eos_token_id}
    criteria = list(extra or [])
    if stop:  # stop generating as soon as a stop sequence is out (the text is cut after decoding)
        criteria.append(_stop_criteria(tok, list(stop), prompt_len))
    if criteria:
        kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
    # the recorder first: logprobs are the model's own, before the request's bias and the grammar's mask
    processors: list[Any] = [recorder] if recorder is not None else []
    if bias is not None:
        processors += bias.processors(prompt_len)
    if grammar is not None:  # xgrammar CompiledGrammar(s) (response_format, strict calls, eval.constrained)
        from xgrammar.contrib.hf import LogitsProcessor  # single-use: one per generate call

        processors.append(LogitsProcessor(grammar))
    if processors:
        kwargs["logits_processor"] = LogitsProcessorList(processors)
    if temperature > 0:
        if seed is not None:
            torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def generate(model: "PreTrainedModel", tok: "PreTrainedTokenizerBase", conversations: list[list[dict[str, Any]]],
             max_new_tokens: int, batch_size: int = 8, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, stop: list[str] | None = None, grammar: Any = None,
             logprobs: int | None = None, bias: TokenBias | None = None,
             tools: list[list[dict[str, Any]] | None] | None = None) -> list[dict[str, Any]]:
    """Batched chat completion; greedy when temperature is 0.

    ``tools``: each conversation's function tools (None: none), shown by the chat template.
    Returns per conversation {text, prompt_tokens, completion_tokens, finish_reason}.
    """
    prompts = [render(tok, c, t) for c, t in zip(conversations, tools or [None] * len(conversations))]
    return generate_text(model, tok, prompts, max_new_tokens, batch_size, temperature, top_p, seed, stop, grammar,
                         logprobs, bias)


def generate_text(model: "PreTrainedModel", tok: "PreTrainedTokenizerBase", prompts: list[str],
                  max_new_tokens: int, batch_size: int = 8, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int | None = None, stop: list[str] | None = None, grammar: Any = None,
                  logprobs: int | None = None, bias: TokenBias | None = None) -> list[dict[str, Any]]:
    """Batched completion of raw prompt texts (what ``generate`` does after the chat template).

    ``grammar``: a compiled xgrammar grammar every row's answer must follow (see ray_qlora.structured), or a
    list of them, one per prompt.
    ``logprobs``: None, or how many alternatives to give per token (0 or more); each result
    then also has "logprobs", one entry per token of its text.
    ``bias``: logit_bias and the presence and frequency penalties.
    """
    import torch

    tok.padding_side = "left"  # decoder-only: pad on the left so every row ends at the prompt
    eot = tok.eos_token_id
    results = []
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                  add_special_tokens=False).to(model.device)
        prompt_len = enc["input_ids"].shape[1]
        recorder = _Logprobs(logprobs) if logprobs is not None else None
        with torch.inference_mode():
            rows = grammar[i:i + batch_size] if isinstance(grammar, list) else grammar
            out = model.generate(**enc, **_sampling(tok, max_new_tokens, temperature, top_p, seed, stop, prompt_len,
                                                    grammar=rows, recorder=recorder, bias=bias))
        if recorder is not None:
            recorder.finish(out)
        for r, (row, mask) in enumerate(zip(out, enc["attention_mask"])):
            new = row[prompt_len:].tolist()
            finished = eot in new
            if finished:
                new = new[:new.index(eot)]
            text, stopped = cut_at_stop(tok.decode(new, skip_special_tokens=True).lstrip(), stop or [])
            result = {"text": text.strip(), "prompt_tokens": int(mask.sum()),
                      "completion_tokens": len(new) + int(finished),
                      "finish_reason": "stop" if finished or stopped else "length"}
            if recorder is not None:
                offsets = _Offsets(tok).covered(new, len(result["text"]))
                result["logprobs"] = _token_logprobs(tok, recorder.row(r, len(offsets)), offsets)
            results.append(result)
    return results


def stream_text(model: "PreTrainedModel", tok: "PreTrainedTokenizerBase", prompt: str, max_new_tokens: int,
                temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                stop: list[str] | None = None, grammar: Any = None,
                logprobs: int | None = None, bias: TokenBias | None = None) -> Iterator[dict[str, Any]]:
    """One completion, piece by piece: {"text": ...} events, then a last {finish_reason, usage counts}.

    Generation runs in a thread feeding a streamer; a stop sequence ends it
    early (the consumer sets a flag the stopping criterion reads). With
    ``logprobs``, events also carry "logprobs" for the tokens whose text has
    been sent (the last event has the rest), as in ``generate_text``.
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
    recorder = _Logprobs(logprobs) if logprobs is not None else None
    result: dict[str, Any] = {}

    def run() -> None:
        with torch.inference_mode():
            result["ids"] = model.generate(**enc, streamer=streamer,
                                           **_sampling(tok, max_new_tokens, temperature, top_p, seed, stop,
                                                       enc["input_ids"].shape[1], [_Cancelled()], grammar,
                                                       recorder, bias))

    offsets, reported, sent = _Offsets(tok), 0, 0

    def with_logprobs(event: dict[str, Any]) -> dict[str, Any]:
        """``event`` plus the entries of the tokens whose text is now out.

        Only settled steps: a token's logprob is known once the next step starts (or generation ends).
        """
        nonlocal reported
        if recorder is None:
            return event
        steps = recorder.row(0)
        ids = [i for i, _, _ in steps]
        if tok.eos_token_id in ids:
            ids = ids[:ids.index(tok.eos_token_id)]
        covered = offsets.covered(ids, sent)
        event["logprobs"] = _token_logprobs(tok, steps[reported:len(covered)], covered[reported:])
        reported = len(covered)
        return event

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
                sent += len(text)
                yield with_logprobs({"text": text})
        if not stopped:
            tail = scanner.flush().rstrip()
            if tail:
                sent += len(tail)
                yield with_logprobs({"text": tail})
    finally:
        cancel.set()
        worker.join()
    new = result["ids"][0, enc["input_ids"].shape[1]:].tolist() if "ids" in result else []
    if recorder is not None and "ids" in result:
        recorder.finish(result["ids"])
    eos = tok.eos_token_id in new
    n = new.index(tok.eos_token_id) + 1 if eos else len(new)
    yield with_logprobs({"finish_reason": "stop" if eos or stopped else "length",
                         "prompt_tokens": int(enc["input_ids"].shape[1]), "completion_tokens": n})
