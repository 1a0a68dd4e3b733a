"""Config validation: shipped files load; bad files fail naming the key to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_qlora.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"run": {"output_uri": "/tmp/out"}, "data": {"input_uris": ["/tmp/data"]}}


def _with(**sections: dict) -> dict:
    cfg = {k: dict(v) for k, v in MINIMAL.items()}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("RAY_QLORA_OUTPUT", "s3://bucket/out")
    monkeypatch.setenv("RAY_QLORA_BASE", "smollm2-135m-instruct")
    cfg = load_config(path)
    assert cfg.data.input_uris


def test_defaults_are_the_qlora_recipe() -> None:
    cfg = parse_config(MINIMAL)
    q = cfg.model.quantization
    assert (q.load_in_4bit, q.quant_type, q.double_quant) == (True, "nf4", True)
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.training.lr_scheduler == "cosine"


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_with(training={"learnig_rate": 1e-4}))
    assert "training.learnig_rate" in str(err.value)
    assert "unknown key" in str(err.value)


def test_every_error_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_with(lora={"r": 0}, training={"batch_size": "eight"}, bogus={}))
    msg = str(err.value)
    for key in ("lora.r", "training.batch_size", "bogus"):
        assert key in msg


def test_missing_required_section_is_named() -> None:
    with pytest.raises(ConfigError, match=r"data: required key is missing"):
        parse_config({"run": {"output_uri": "/tmp"}})


@pytest.mark.parametrize("space, needle", [
    ({"learnig_rate": {"values": [1e-4]}}, "unknown search key"),
    ({"learning_rate": {"values": [1e-4], "choice": [1e-3]}}, "exactly one"),
    ({"learning_rate": {"loguniform": [1e-3, 1e-4]}}, "low must be below high"),
    ({"learning_rate": {"loguniform": [0, 1e-4]}}, "low must be > 0"),
])
def test_bad_search_space(space: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as err:
        parse_config(_with(tune={"search_space": space}))
    assert "tune.search_space" in str(err.value)


def test_serve_scaling_modes_exclude_each_other() -> None:
    with pytest.raises(ConfigError, match="serve"):
        parse_config(_with(serve={"num_replicas": 2, "autoscaling": {"max_replicas": 3}}))
    with pytest.raises(ConfigError, match="max_replicas must be >= min_replicas"):
        parse_config(_with(serve={"autoscaling": {"min_replicas": 3, "max_replicas": 2}}))


def test_autoscaling_window_must_span_a_load_report() -> None:
    """Ray Serve only warns, in the controller's log, about a window its replicas' reports cannot fill."""
    with pytest.raises(ConfigError, match=r"serve\.autoscaling\.look_back_period_s: must be greater than 10 s"):
        parse_config(_with(serve={"autoscaling": {"look_back_period_s": 10}}))
    ok = parse_config(_with(serve={"autoscaling": {"look_back_period_s": 10.5}}))
    assert ok.serve.autoscaling.look_back_period_s == 10.5


def test_the_window_bound_is_the_installed_ray_serves() -> None:
    """The bound copies Ray's rule: Ray warns exactly where the config refuses, and a Ray that moves it fails here."""
    import warnings

    from ray.serve.config import AutoscalingConfig as RayAutoscalingConfig

    from ray_qlora.config import SERVE_METRICS_PUSH_INTERVAL_S

    assert RayAutoscalingConfig().metrics_interval_s == SERVE_METRICS_PUSH_INTERVAL_S
    with pytest.warns(FutureWarning, match="look_back_period_s"):
        RayAutoscalingConfig(look_back_period_s=SERVE_METRICS_PUSH_INTERVAL_S)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        RayAutoscalingConfig(look_back_period_s=SERVE_METRICS_PUSH_INTERVAL_S + 0.5)


def test_env_expansion_and_missing_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("run: {output_uri: '${OUT_URI}'}\ndata: {input_uris: ['${IN_URI:-/data}']}\n")
    monkeypatch.setenv("OUT_URI", "s3://b/o")
    cfg = load_config(f)
    assert (cfg.run.output_uri, cfg.data.input_uris) == ("s3://b/o", ["/data"])
    monkeypatch.delenv("OUT_URI")
    with pytest.raises(ConfigError, match=r"run\.output_uri: environment variable OUT_URI is not set"):
        load_config(f)


def test_env_references_in_comments_are_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commented-out line is not configuration: its variable need not be set, nor replaced."""
    monkeypatch.delenv("NEVER_SET", raising=False)
    f = tmp_path / "c.yaml"
    f.write_text("run: {output_uri: /tmp/out}  # or ${NEVER_SET}\n"
                 "# model: {base: ${NEVER_SET}}\n"
                 "data: {input_uris: [/tmp/data]}\n")
    assert load_config(f).run.output_uri == "/tmp/out"


@pytest.mark.parametrize("value", ["s3://b/run #1", "s3://b/a: b", "s3://b/'q\"", "s3://b/x\nlora: {r: 1}"])
def test_env_values_stay_one_string_whatever_they_hold(value: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """YAML's own characters in a variable can neither cut the value short nor add keys."""
    monkeypatch.setenv("OUT_URI", value)
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  output_uri: ${OUT_URI}\ndata: {input_uris: ['${OUT_URI}/raw']}\n")
    cfg = load_config(f)
    assert (cfg.run.output_uri, cfg.data.input_uris, cfg.lora.r) == (value, [value + "/raw"], 16)


def test_env_values_take_their_fields_types(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("run: {output_uri: /tmp/out}\ndata: {input_uris: [/tmp/data]}\n"
                 "storage: {endpoint_url: '${EP:-}'}\nlora: {r: '${R:-8}', alpha: '${ALPHA}'}\n"
                 "training:\n  learning_rate: ${LR}\n  gradient_checkpointing: ${GC}\n")
    monkeypatch.delenv("EP", raising=False)
    monkeypatch.delenv("R", raising=False)
    monkeypatch.setenv("ALPHA", "64")
    monkeypatch.setenv("LR", "1e-4")
    monkeypatch.setenv("GC", "false")
    cfg = load_config(f)
    # an empty single reference is "unset", as `endpoint_url:` with no value would be
    assert cfg.storage.endpoint_url is None
    assert (cfg.lora.r, cfg.lora.alpha, cfg.training.learning_rate) == (8, 64, 1e-4)
    assert cfg.training.gradient_checkpointing is False
    monkeypatch.setenv("R", "four")
    with pytest.raises(ConfigError, match=r"lora\.r"):
        load_config(f)


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_revalidated() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.with_overrides({"lora.r": 4}).lora.r == 4
    with pytest.raises(ConfigError, match="lora.r"):
        cfg.with_overrides({"lora.r": -1})


def test_secrets_never_in_config() -> None:
    with pytest.raises(ConfigError, match="storage.aws_secret_access_key"):
        parse_config(_with(storage={"aws_secret_access_key": "x"}))


def test_optuna_refuses_a_grid_with_the_key_named() -> None:
    with pytest.raises(ConfigError, match=r"\['learning_rate'\]: grid 'values' cannot be used with search_algorithm"):
        parse_config(_with(tune={"search_space": {"learning_rate": {"values": [1e-4]}}, "search_algorithm": "optuna"}))


def test_synchronous_halving_refuses_optuna_with_the_key_named() -> None:
    with pytest.raises(ConfigError, match=r"tune: asha.synchronous needs every trial of the search known up front"):
        parse_config(_with(tune={"search_space": {"learning_rate": {"choice": [1e-4, 1e-3]}},
                                 "search_algorithm": "optuna", "asha": {"synchronous": True}}))
    cfg = parse_config(_with(tune={"asha": {"synchronous": True}}))  # grid and random sampling are fine
    assert cfg.tune.asha.synchronous and cfg.tune.asha.enabled


def test_any_training_or_lora_key_is_searchable_and_its_values_are_checked() -> None:
    cfg = parse_config(_with(tune={"search_space": {"lora.target_modules": {"choice": ["q_proj,v_proj", "all-linear"]},
                                                    "training.warmup_ratio": {"uniform": [0.0, 0.2]},
                                                    "lora.r": {"randint": [4, 32]}}}))
    assert set(cfg.tune.search_space) == {"lora.target_modules", "training.warmup_ratio", "lora.r"}
    with pytest.raises(ConfigError, match=r"tune.search_space.lora.dropout: 1.5 is not a valid lora.dropout"):
        parse_config(_with(tune={"search_space": {"lora.dropout": {"values": [0.1, 1.5]}}}))
    with pytest.raises(ConfigError, match="unknown search key"):
        parse_config(_with(tune={"search_space": {"serve.port": {"values": [1]}}}))


def test_set_overrides_apply_before_validation(tmp_path) -> None:  # noqa: ANN001
    from ray_qlora.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("run: {output_uri: /tmp/o}\ndata: {input_uris: [/tmp/i]}\ntraining: {learning_rate: -1}\n")
    cfg = load_config(path, ["training.learning_rate=1e-4", "lora.target_modules=q_proj,v_proj"])
    assert cfg.training.learning_rate == 1e-4 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="training.lerning_rate: unknown key"):
        load_config(path, ["training.lerning_rate=1e-4"])
    with pytest.raises(ConfigError, match="write section.key=value"):
        load_config(path, ["learning_rate"])


@pytest.mark.parametrize("modules", [[], " , ", ""])
def test_lora_targets_must_name_a_module(modules: object) -> None:
    with pytest.raises(ConfigError, match=r"lora\.target_modules: name at least one module, or 'all-linear'"):
        parse_config({**MINIMAL, "lora": {"target_modules": modules}})
