"""The whole pipeline on a tiny random model, local S3 and a local Ray, through HTTP.

prepare -> tune (2 concurrent trials) -> merge (verified) -> evaluate -> serve,
then real requests: the `openai` SDK for a chat completion, raw HTTP for the
error cases a client can cause.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from ray_qlora import storage
from ray_qlora.config import parse_config
from ray_qlora.data.sample import SYSTEM_PROMPT
from ray_qlora.demo import upload_sample
from ray_qlora.local_s3 import free_port

pytestmark = pytest.mark.integration

API_KEY = "it-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# '{"r": "PO"}' is 11 characters: with EOS, at most 12 tokens however a model splits it
ORDER_SCHEMA = {"type": "object", "properties": {"r": {"enum": ["PO", "IV"]}}, "required": ["r"],
                "additionalProperties": False}


@pytest.fixture(scope="module")
def finished_run(local_s3, ray_local, tiny_model_dir: Path, tmp_path_factory):  # noqa: ANN001, ANN201
    from ray import serve

    from ray_qlora.pipeline import run_pipeline

    local_s3.create_bucket("it-bucket")
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"{API_KEY}\n")
    cfg = parse_config({
        "run": {"output_uri": "s3://it-bucket/out", "run_id": "it", "seed": 1},
        "data": {"input_uris": ["s3://it-bucket/raw/"], "system_prompt": SYSTEM_PROMPT,
                 "max_seq_length": 128, "eval_fraction": 0.1},
        "model": {"base": str(tiny_model_dir)},
        "lora": {"r": 4, "alpha": 8},
        "training": {"max_steps": 4, "eval_steps": 2, "batch_size": 4, "logging_steps": 1},
        "tune": {"search_space": {"learning_rate": {"values": [1e-3, 1e-2]}}, "max_concurrent_trials": 2,
                 "asha": {"enabled": False}},
        "merge": {"dtype": "float32", "verify_prompts": 3, "verify_max_new_tokens": 8, "verify_min_match": 1.0},
        # answers generated under a schema (as response_format serves them): at most 12 tokens however the
        # model spells them, so every answer closes within the budget
        "eval": {"max_examples": 4, "max_new_tokens": 12, "batch_size": 2, "compare_adapter": True,
                 "json_schema": ORDER_SCHEMA, "constrained": True},
        "adapters": {"name": "med-orders", "top_k": 2},
        "serve": {"port": free_port(), "model_name": "tiny", "max_new_tokens": 48, "max_body_bytes": 65536,
                  "api_key_file": str(key_file)},
    })
    upload_sample("s3://it-bucket/raw", cfg.storage)
    run = run_pipeline(cfg)
    yield cfg, run
    serve.shutdown()


def test_run_folder_and_lineage(finished_run) -> None:  # noqa: ANN001
    cfg, run = finished_run
    rec = storage.read_json(run.paths.run_json, cfg.storage)
    assert set(rec["stages"]) == {"prepare", "tune", "merge", "evaluate", "serve"}
    assert all(s["status"] == "succeeded" for s in rec["stages"].values())
    assert rec["config"]["run"]["output_uri"] == "s3://it-bucket/out"
    manifest = storage.read_json(run.paths.manifest, cfg.storage)
    assert manifest["counts"]["quarantine"] == 4 and manifest["counts"]["duplicate"] == 1  # malformed rows, a copy
    assert rec["stages"]["prepare"]["result"]["input_hash"] == manifest["input_hash"]


def test_two_trials_ran_and_best_adapter_is_adapter_only(finished_run) -> None:  # noqa: ANN001
    cfg, run = finished_run
    tune_res = run.output("tune")
    assert tune_res["trials"] == 2
    board = storage.read_json(tune_res["leaderboard_uri"], cfg.storage)
    assert {row["params"]["learning_rate"] for row in board} == {1e-3, 1e-2}
    assert tune_res["best_eval_loss"] == min(r["best_eval_loss"] for r in board)
    files = [f.rsplit("/", 1)[-1] for f in storage.list_files(tune_res["best_adapter_uri"], cfg.storage)]
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert "model.safetensors" not in files, "checkpoints must hold the adapter, never the base"
    assert storage.exists(storage.join(run.paths.root, "tune", "eval_loss.png"), cfg.storage)


def test_merged_export_is_complete_and_verified(finished_run) -> None:  # noqa: ANN001
    cfg, run = finished_run
    merge_res = run.output("merge")
    assert merge_res["verified"] and merge_res["verify_match"] == 1.0
    names = {f.rsplit("/", 1)[-1] for f in storage.list_files(run.paths.merged, cfg.storage)}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    tok_cfg = json.loads(storage.read_bytes(storage.join(run.paths.merged, "tokenizer_config.json"), cfg.storage))
    chat_template_file = "chat_template.jinja" in names
    assert chat_template_file or tok_cfg.get("chat_template"), "the chat template travels with the model"


def test_evaluate_report(finished_run) -> None:  # noqa: ANN001
    cfg, run = finished_run
    report = storage.read_json(run.paths.report, cfg.storage)
    for side in ("base", "tuned", "adapter"):
        assert {"eval_loss", "exact_match", "normalized_match", "valid_json", "field_accuracy"} <= set(report[side])
        # eval.constrained: even the random base answers in the schema, which it never does on its own
        assert report[side]["schema_valid"] == 1.0, report[side]
    assert report["examples"] == 4
    # 4 rows in batches of 2 on a 4-CPU Ray: two generation actors, each with its own model, both generated
    assert report["actors"] == 2
    # merged in float32, the merged model answers exactly as base + adapter does
    assert report["merged_vs_adapter_agreement"] == 1.0
    assert report["adapter"]["eval_loss"] == pytest.approx(report["tuned"]["eval_loss"], rel=1e-4)
    assert report["tuned"]["eval_loss"] != pytest.approx(report["base"]["eval_loss"], rel=1e-3)
    for name in ("base_vs_tuned.png", "summary.md", "predictions.json"):
        assert storage.exists(storage.join(run.paths.eval_dir, name), cfg.storage), name
    summary = storage.read_bytes(storage.join(run.paths.eval_dir, "summary.md"), cfg.storage).decode()
    assert "| metric | base | tuned | adapter |" in summary and "## Samples" in summary
    card = storage.read_bytes(storage.join(run.paths.merged, "README.md"), cfg.storage).decode()
    assert "## Evaluation" in card and f"{report['tuned']['exact_match']:.1%}" in card


def test_best_and_runner_up_adapters_published_with_lineage(finished_run) -> None:  # noqa: ANN001
    import hashlib

    from ray_qlora import adapters
    from ray_qlora.modeling import base_fingerprint

    cfg, run = finished_run
    published = run.output("tune")["published"]
    assert [(p["name"], p["version"]) for p in published] == [("med-orders", "v1"), ("med-orders-rank2", "v1")]
    best = adapters.show(cfg, "med-orders")
    board = storage.read_json(run.output("tune")["leaderboard_uri"], cfg.storage)
    assert best["trial"] == board[0]["trial"] and best["rank"] == 1
    assert best["metrics"]["best_eval_loss"] == board[0]["best_eval_loss"]
    assert best["params"]["learning_rate"] == board[0]["params"]["learning_rate"]
    assert best["base_model"]["sha256"] == base_fingerprint(Path(cfg.model.base))
    assert best["data_manifest_sha256"] == hashlib.sha256(
        storage.read_bytes(run.paths.manifest, cfg.storage)).hexdigest()
    assert best["lora"]["r"] == 4 and best["run_id"] == "it"
    assert adapters.show(cfg, "med-orders-rank2")["trial"] == board[1]["trial"]
    files = {f.rsplit("/", 1)[-1] for f in storage.list_files(best["uri"], cfg.storage)}
    assert {"adapter_model.safetensors", "adapter_config.json", "chat_template.jinja", "Modelfile",
            "metadata.json"} <= files
    assert "optimizer.pt" not in files  # the registry holds the adapter, not the trial's resume state


def test_exports_gguf_modelfile_and_card(finished_run) -> None:  # noqa: ANN001
    cfg, run = finished_run
    merge_res = run.output("merge")
    gguf = merge_res["gguf"]
    assert gguf["gguf_type"] == "f16" and gguf["tokenizer_match"] is True
    assert gguf["max_rel_logit_diff"] < 0.01  # f16 of a float32 tiny model: rounding only
    assert storage.exists(gguf["uri"], cfg.storage) and storage.exists(storage.join(run.paths.gguf, "Modelfile"),
                                                                      cfg.storage)
    modelfile = storage.read_bytes(storage.join(run.paths.merged, "Modelfile"), cfg.storage).decode()
    assert modelfile.startswith("FROM .") and 'PARAMETER stop "<|im_end|>"' in modelfile
    card = storage.read_bytes(storage.join(run.paths.merged, "README.md"), cfg.storage).decode()
    assert merge_res["base_sha256"] in card and merge_res["data_manifest_sha256"] in card
    assert run.output("tune")["best_trial"] in card


def _client(run):  # noqa: ANN001, ANN202
    from openai import OpenAI

    return OpenAI(base_url=run.output("serve")["base_url"], api_key=API_KEY)


def test_chat_completion_through_openai_sdk(finished_run) -> None:  # noqa: ANN001
    _, run = finished_run
    client = _client(run)
    assert [m.id for m in client.models.list().data] == ["tiny", "med-orders", "med-orders-rank2"]
    msgs = [{"role": "user", "content": "Give aspirin 81 mg PO daily."}]
    resp = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert resp.usage.completion_tokens <= 5 and resp.usage.prompt_tokens > 0
    assert choice.finish_reason in ("stop", "length")
    # greedy decoding is deterministic, and content given as text parts is the same request
    parts = [{"role": "user", "content": [{"type": "text", "text": "Give aspirin 81 mg PO daily."}]}]
    again = client.chat.completions.create(model="tiny", messages=parts, max_tokens=5, temperature=0)
    assert again.choices[0].message.content == choice.message.content
    # the best adapter from the registry, unmerged on the shared base, answers as the merged model does
    adapter = client.chat.completions.create(model="med-orders", messages=msgs, max_tokens=5, temperature=0)
    assert adapter.model == "med-orders" and adapter.choices[0].message.content == choice.message.content


def test_streaming_gives_the_same_text_and_usage(finished_run) -> None:  # noqa: ANN001
    _, run = finished_run
    client = _client(run)
    msgs = [{"role": "user", "content": "Give metformin 500 mg PO BID."}]
    whole = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stop_sequences_are_honoured_also_while_streaming(finished_run) -> None:  # noqa: ANN001
    from ray_qlora.generation import cut_at_stop

    _, run = finished_run
    client = _client(run)
    msgs = [{"role": "user", "content": "Give lisinopril 10 mg PO QD."}]
    free = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0)
    answer = free.choices[0].message.content
    assert len(answer) >= 6, answer
    stop = answer[len(answer) // 2:len(answer) // 2 + 2]  # a piece from the middle of the greedy answer
    expected = cut_at_stop(answer, [stop])[0].strip()
    cut = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0, stop=stop,
                                              stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_response_format_makes_answers_follow_the_schema(finished_run) -> None:  # noqa: ANN001
    import jsonschema
    from openai import BadRequestError

    _, run = finished_run
    client = _client(run)
    schema = ORDER_SCHEMA  # at most 12 tokens however the model spells it: within the 16 asked for
    fmt = {"type": "json_schema", "json_schema": {"name": "order", "schema": schema, "strict": True}}
    msgs = [{"role": "user", "content": "Give aspirin 81 mg PO daily."}]
    for model in ("tiny", "med-orders"):  # the merged model, and an adapter on the shared base
        out = client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0,
                                             response_format=fmt)
        assert out.choices[0].finish_reason == "stop", out
        jsonschema.validate(json.loads(out.choices[0].message.content), schema)
        chunks = client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0,
                                                response_format=fmt, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content
    with pytest.raises(BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "bogus"}}})
    assert err.value.body["param"] == "response_format" and "bogus" in err.value.body["message"]


def test_logprobs_come_with_each_answer_token(finished_run) -> None:  # noqa: ANN001
    import math

    _, run = finished_run
    client = _client(run)
    msgs = [{"role": "user", "content": "Give aspirin 81 mg PO daily."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER_SCHEMA}}
    for model, extra in (("tiny", {}), ("med-orders", {}), ("tiny", {"response_format": fmt})):
        out = client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0,
                                             logprobs=True, top_logprobs=2, **extra)
        content = out.choices[0].logprobs.content
        assert "".join(t.token for t in content).strip() == out.choices[0].message.content
        for t in content:
            assert t.logprob <= 0 and bytes(t.bytes).decode("utf-8", "replace") == t.token
            assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
            if not extra:  # greedy and unconstrained: each token is the model's likeliest
                assert t.top_logprobs[0].token == t.token and math.isclose(t.top_logprobs[0].logprob, t.logprob)
        chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0,
                                                     logprobs=True, top_logprobs=2, stream=True, **extra))
        streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
        assert [t.token for t in streamed] == [t.token for t in content]
        assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-3) for a, b in zip(streamed, content))
    plain = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None  # only when asked
    text = client.completions.create(model="tiny", prompt="The dose is", max_tokens=4, temperature=0, logprobs=1)
    lp = text.choices[0].logprobs
    assert "".join(lp.tokens).strip() == text.choices[0].text and len(lp.token_logprobs) == len(lp.tokens)
    assert lp.text_offset == sorted(lp.text_offset) and all(len(alt) == 1 for alt in lp.top_logprobs)


ORDER_TOOL = {"type": "function", "function": {
    "name": "place_order", "description": "Place a medication order",
    "parameters": {"type": "object", "required": ["route", "times_a_day"], "additionalProperties": False,
                   "properties": {"route": {"enum": ["PO", "IV"]},
                                  "times_a_day": {"type": "integer", "minimum": 1, "maximum": 4}}}}}


def _valid_order(call) -> bool:  # noqa: ANN001
    args = json.loads(call.function.arguments)
    return call.function.name == "place_order" and args["route"] in ("PO", "IV") and 1 <= args["times_a_day"] <= 4


def test_forced_tool_calls_come_back_as_openai_tool_calls(finished_run, tokenizer_dir: Path) -> None:  # noqa: ANN001
    from openai import BadRequestError
    from transformers import AutoTokenizer

    _, run = finished_run
    client = _client(run)
    msgs = [{"role": "user", "content": "Give aspirin 81 mg PO daily."}]
    named = {"type": "function", "function": {"name": "place_order"}}
    for model in ("tiny", "med-orders"):
        out = client.chat.completions.create(model=model, messages=msgs, tools=[ORDER_TOOL], tool_choice=named,
                                             max_tokens=24, temperature=0)
        choice = out.choices[0]
        assert choice.finish_reason == "stop" and choice.message.content is None  # OpenAI's shape for a named call
        (call,) = choice.message.tool_calls
        assert _valid_order(call) and call.id.startswith("call_")
        required = client.chat.completions.create(model=model, messages=msgs, tools=[ORDER_TOOL],
                                                  tool_choice="required", parallel_tool_calls=False,
                                                  max_tokens=48, temperature=0)
        assert required.choices[0].finish_reason == "tool_calls"
        assert [_valid_order(c) for c in required.choices[0].message.tool_calls] == [True]  # one, as asked
        # streamed: the SDK's chunks carry the same call
        chunks = list(client.chat.completions.create(model=model, messages=msgs, tools=[ORDER_TOOL],
                                                     tool_choice=named, max_tokens=24, temperature=0, stream=True))
        deltas = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls
                  for tc in c.choices[0].delta.tool_calls]
        assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == [
            (0, "place_order", call.function.arguments)]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    # the tool's result goes back in the conversation; tool_choice 'none' then asks for text
    follow_up = [*msgs, out.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"status": "placed"}'}]
    text = client.chat.completions.create(model="tiny", messages=follow_up, tools=[ORDER_TOOL], tool_choice="none",
                                          max_tokens=4, temperature=0)
    assert text.choices[0].message.tool_calls is None and isinstance(text.choices[0].message.content, str)
    # 'auto' (the default with tools): the merged model's template (SmolLM2's, with the tool front training
    # gave it) lists the tool in the prompt, and the answer is text or calls read from Hermes tags
    auto = client.chat.completions.create(model="tiny", messages=msgs, tools=[ORDER_TOOL], max_tokens=8,
                                          temperature=0)
    free = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    shown = len(AutoTokenizer.from_pretrained(str(tokenizer_dir))(json.dumps(ORDER_TOOL))["input_ids"])
    assert auto.usage.prompt_tokens > free.usage.prompt_tokens + shown
    assert (auto.choices[0].message.tool_calls is None) == (auto.choices[0].finish_reason != "tool_calls")
    # strict (OpenAI's 'strict: true'): a call the model opens is held to the tool's schema (the grammar is
    # tested on a model that calls, in test_serve_tools.py); this random one answers the same text as free
    strict = {"type": "function", "function": {**ORDER_TOOL["function"], "strict": True}}
    for model in ("tiny", "med-orders"):
        held, free = (client.chat.completions.create(model=model, messages=msgs, tools=[tool], max_tokens=8,
                                                     temperature=0).choices[0].message for tool in (strict, ORDER_TOOL))
        assert held.tool_calls is None and held.content == free.content
    # streamed as it comes, not held for the end: "mg mg mg mg" (logit_bias) arrives token by token
    (mg,) = AutoTokenizer.from_pretrained(str(tokenizer_dir))(" mg", add_special_tokens=False)["input_ids"]
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, tools=[ORDER_TOOL], max_tokens=4,
                                                 temperature=0, logit_bias={str(mg): 100}, stream=True))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert texts == ["mg", " mg", " mg", " mg"]
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": 7}}}
    with pytest.raises(BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=msgs, tools=[bad], tool_choice="required")
    assert (err.value.body["param"], err.value.body["code"]) == ("tools", "invalid_json_schema")


def test_logit_bias_and_penalties_are_honoured(finished_run, tokenizer_dir: Path) -> None:  # noqa: ANN001
    from openai import BadRequestError
    from transformers import AutoTokenizer

    _, run = finished_run
    client = _client(run)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    (mg,) = tok(" mg", add_special_tokens=False)["input_ids"]
    msgs = [{"role": "user", "content": "Give aspirin 81 mg PO daily."}]
    for model in ("tiny", "med-orders"):
        out = client.chat.completions.create(model=model, messages=msgs, max_tokens=4, temperature=0,
                                             logit_bias={str(mg): 100})
        assert out.choices[0].message.content == "mg mg mg mg"
    free = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0)
    # banning the free answer's first token: logprobs show another one picked
    first = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=1, temperature=0,
                                           logprobs=True).choices[0].logprobs.content[0].token
    (first_id,) = tok(first, add_special_tokens=False)["input_ids"]
    banned = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0,
                                            logit_bias={str(first_id): -100}, logprobs=True)
    assert banned.choices[0].logprobs.content[0].token != first
    penalised = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0,
                                               frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised.choices[0].message.content != free.choices[0].message.content
    with pytest.raises(BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, logit_bias={"10000000": 5})
    assert err.value.body["code"] == "invalid_logit_bias" and err.value.body["param"] == "logit_bias"


def test_n_choices_come_from_one_seeded_batch(finished_run) -> None:  # noqa: ANN001
    _, run = finished_run
    client = _client(run)
    kw = {"prompt": "The dose is", "max_tokens": 8, "temperature": 1.5, "seed": 11}
    one = client.completions.create(model="tiny", n=4, **kw)
    texts = [c.text for c in one.choices]
    assert [c.index for c in one.choices] == [0, 1, 2, 3] and len(set(texts)) > 1  # sampled apart, not copies
    assert one.usage.completion_tokens <= 4 * 8 and one.usage.prompt_tokens == 3  # the prompt counted once
    assert [c.text for c in client.completions.create(model="tiny", n=4, **kw).choices] == texts  # the seed fixes all
    # also when identical seeded requests arrive together (the server batches concurrent requests)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda _: [c.text for c in client.completions.create(model="tiny", n=4, **kw).choices],
                                 range(4)))
    assert together == [texts] * 4
    msgs = [{"role": "user", "content": "Give aspirin 81 mg PO daily."}]
    for model in ("tiny", "med-orders"):
        greedy = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0, n=2)
        assert len(greedy.choices) == 2 and greedy.choices[0].message.content == greedy.choices[1].message.content
        assert greedy.usage.completion_tokens == 2 * client.chat.completions.create(
            model=model, messages=msgs, max_tokens=8, temperature=0).usage.completion_tokens


def test_text_completions(finished_run) -> None:  # noqa: ANN001
    _, run = finished_run
    client = _client(run)
    out = client.completions.create(model="tiny", prompt="The dose is", max_tokens=4, temperature=0)
    assert out.object == "text_completion" and out.usage.completion_tokens <= 4 and out.usage.prompt_tokens == 3
    streamed = list(client.completions.create(model="tiny", prompt="The dose is", max_tokens=4, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text


def test_bad_requests_get_4xx_with_error_body(finished_run) -> None:  # noqa: ANN001
    _, run = finished_run
    base = run.output("serve")["base_url"]
    url = base + "/chat/completions"
    user = [{"role": "user", "content": "x"}]
    cases = [
        (b"{oops", 400, None),
        (json.dumps({"model": "tiny", "messages": []}).encode(), 400, None),
        (json.dumps({"model": "tiny", "messages": user, "temperature": -1}).encode(), 400, None),
        (json.dumps({"model": "tiny", "messages": user, "n": 17}).encode(), 400, "too_many_choices"),
        (json.dumps({"model": "other", "messages": user}).encode(), 404, "model_not_found"),
        (json.dumps({"model": "tiny", "messages": user, "max_tokens": 49}).encode(), 400, "max_tokens_exceeded"),
        # the tiny model's context is 512 tokens
        (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "dose " * 600}]}).encode(), 400,
         "context_length_exceeded"),
        (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 70000}]}).encode(), 400,
         "request_too_large"),
    ]
    for body, status, code in cases:
        r = httpx.post(url, content=body, headers={"content-type": "application/json", **AUTH}, timeout=30)
        assert r.status_code == status, r.text
        assert set(r.json()["error"]) >= {"message", "type"}
        if code:
            assert r.json()["error"]["code"] == code, r.text
    ok = json.dumps({"model": "tiny", "messages": user, "max_tokens": 2}).encode()
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(url, content=ok, headers={"content-type": "application/json", **headers}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # the replica is still fine after all that
    assert httpx.post(url, content=ok, headers={"content-type": "application/json", **AUTH}, timeout=30).status_code == 200
    root = base.removesuffix("/v1")
    assert httpx.get(root + "/health/live", timeout=30).status_code == 200
    ready = httpx.get(root + "/health/ready", timeout=60)
    assert ready.status_code == 200 and ready.json()["generated_tokens"] == 1


def test_stage_verbs_read_earlier_results(finished_run) -> None:  # noqa: ANN001
    """`ray-qlora merge` on a run without a tune result says which verb to run first."""
    from ray_qlora.pipeline import Run, run_stage

    cfg, _ = finished_run
    with pytest.raises(RuntimeError, match="stage 'tune' has not succeeded"):
        run_stage(Run(cfg, "never-tuned"), "merge")


def test_a_tool_use_run_evaluates_with_the_rows_tools_and_scores_calls(local_s3, ray_local, tiny_model_dir: Path,
                                                                       finished_run) -> None:  # noqa: ANN001
    """The tool sample through prepare -> tune -> merge -> evaluate: tools reach the eval prompts, calls are
    scored as name + arguments. (After the served run's tests: one cluster, one run at a time.)"""
    import pyarrow.dataset as pads

    from ray_qlora.data.sample import PLACE_ORDER, TOOL_SYSTEM_PROMPT, tool_sample_files
    from ray_qlora.evaluate import reference
    from ray_qlora.pipeline import run_pipeline

    local_s3.create_bucket("it-tools")
    cfg = parse_config({
        "run": {"output_uri": "s3://it-tools/out", "run_id": "tools", "seed": 1},
        "data": {"input_uris": ["s3://it-tools/raw/"], "system_prompt": TOOL_SYSTEM_PROMPT,
                 "max_seq_length": 512, "eval_fraction": 0.25},
        "model": {"base": str(tiny_model_dir)},
        "lora": {"r": 4, "alpha": 8},
        "training": {"max_steps": 2, "eval_steps": 2, "batch_size": 2, "logging_steps": 1},
        "tune": {"search_space": {"learning_rate": {"values": [1e-3]}}, "max_concurrent_trials": 1,
                 "asha": {"enabled": False}},
        "merge": {"dtype": "float32", "verify_prompts": 2, "verify_max_new_tokens": 4},
        "eval": {"max_examples": 6, "max_new_tokens": 4, "batch_size": 3},
        "serve": {"strict_tools": True},  # evaluated as served: each row's calls held to its tools
    })
    for name, data in tool_sample_files(n=40).items():
        storage.write_bytes(f"s3://it-tools/raw/{name}", data, cfg.storage)
    run = run_pipeline(cfg, stages=("prepare", "tune", "merge", "evaluate"))
    manifest = storage.read_json(run.paths.manifest, cfg.storage)
    assert manifest["counts"]["quarantine"] == 2 and manifest["checks"]["tool_use"] == "hermes tags (tool front)"
    # every held-out row keeps its tools, and a row ending on a call is scored against the call itself
    fs, path = storage.resolve(run.paths.eval, cfg.storage)
    rows = sorted(pads.dataset(path, filesystem=fs, format="parquet").to_table(
        columns=["messages", "tools", "content_hash"]).to_pylist(), key=lambda r: r["content_hash"])
    assert rows and all(json.loads(r["tools"]) == [PLACE_ORDER] for r in rows)
    last = [json.loads(r["messages"])[-1] for r in rows]
    report = run.output("evaluate")
    assert report["examples"] == min(6, len(rows)) and report["generated_under"] == "strict tool calls"
    assert {"call_exact", "call_name_match"} <= set(report["tuned"])  # some held-out answers are calls
    assert [s["reference"] for s in report["samples"]] == [reference(m) for m in last][:len(report["samples"])]
    calls = [json.loads(reference(m)) for m in last if m.get("tool_calls")]
    assert calls and all(c[0]["name"] == "place_order" and set(c[0]["arguments"]) == {"drug", "dose_mg", "route",
                                                                                          "frequency"} for c in calls)
