"""What the cluster leans on (infra/): the CloudFormation template, the monitoring config, the bucket bootstrap.

Fast: nothing here starts Ray. Dashboards are checked against metric names
that exist: Ray's, from ``infra/monitoring/ray_metrics.txt`` (scraped from a
running Ray by ``infra/monitoring/scrape_ray_metrics.py``), and the project's,
read from the metric definitions in ``ray_qlora/``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
TEMPLATE = INFRA / "aws" / "cloudformation.yaml"
MONITORING = INFRA / "monitoring"
DASHBOARDS = sorted((MONITORING / "dashboards").glob("*.json"))


# -- CloudFormation ----------------------------------------------------------------------------------------

class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags (!Ref, !Sub, !GetAtt ...) read as their long JSON form."""


def _cfn_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _cfn_tag)


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return yaml.load(TEMPLATE.read_text(), Loader=_CfnLoader)  # noqa: S506 - a SafeLoader subclass


def _resources(tpl: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in tpl["Resources"].items() if r["Type"] == kind}


def _as_list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else [x]


def _render(value: Any) -> str:
    """A policy value as text: ``{"Fn::GetAtt": ["Bucket", "Arn"]}`` -> ``${Bucket.Arn}``."""
    if isinstance(value, str):
        return value
    if "Ref" in value:
        return "${%s}" % value["Ref"]
    if "Fn::GetAtt" in value:
        return "${%s}" % ".".join(value["Fn::GetAtt"])
    if "Fn::Sub" in value and isinstance(value["Fn::Sub"], str):
        return value["Fn::Sub"]
    raise AssertionError(f"unexpected intrinsic in a policy: {value}")


def test_template_passes_cfn_lint() -> None:
    cfnlint_api = pytest.importorskip("cfnlint.api", reason="cfn-lint is not installed (pip install cfn-lint)")
    config = cfnlint_api.ManualArgs(include_checks=["I"], regions=["us-east-1", "eu-west-1"])
    matches = cfnlint_api.lint_file(TEMPLATE, config)
    assert not matches, "\n".join(str(m) for m in matches)


def _node_statements(tpl: dict[str, Any]) -> list[dict[str, Any]]:
    """Every statement any IAM role or policy of the template grants."""
    out: list[dict[str, Any]] = []
    for role in _resources(tpl, "AWS::IAM::Role").values():
        assert not role["Properties"].get("ManagedPolicyArns"), "managed policies grant more than the prefix"
        for policy in role["Properties"].get("Policies", []):
            out += policy["PolicyDocument"]["Statement"]
    for kind in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
        for policy in _resources(tpl, kind).values():
            out += policy["Properties"]["PolicyDocument"]["Statement"]
    return out


def test_node_role_grants_only_the_project_prefix(template: dict[str, Any]) -> None:
    statements = _node_statements(template)
    assert statements, "the template grants the nodes nothing"
    bucket, objects = "${Bucket.Arn}", "${Bucket.Arn}/${Prefix}/*"
    granted: dict[str, set[str]] = {}
    for st in statements:
        assert st["Effect"] == "Allow" and not {"NotAction", "NotResource", "NotPrincipal"} & set(st), st
        actions, resources = _as_list(st["Action"]), [_render(r) for r in _as_list(st["Resource"])]
        for action in actions:
            assert action.startswith("s3:") and "*" not in action, f"{action}: only named S3 actions"
            granted.setdefault(action, set()).update(resources)
        if "s3:ListBucket" in actions:  # listing: the bucket, but only keys under the prefix
            assert resources == [bucket], st
            (op, cond), = st["Condition"].items()
            assert op.startswith("StringLike") and set(cond) == {"s3:prefix"}, st["Condition"]
            prefixes = [_render(p) for p in cond["s3:prefix"]]
            assert all(p in ("${Prefix}", "${Prefix}/*") for p in prefixes), prefixes
        else:
            assert resources == [objects], f"{actions} on {resources}: object actions only under the prefix"
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= set(granted)


def test_node_role_is_for_ec2_with_an_instance_profile(template: dict[str, Any]) -> None:
    (role_name, role), = _resources(template, "AWS::IAM::Role").items()
    (st,) = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert st["Action"] == "sts:AssumeRole" and _render(st["Principal"]["Service"]).startswith("ec2.")
    profiles = _resources(template, "AWS::IAM::InstanceProfile").values()
    assert [p["Properties"]["Roles"] for p in profiles] == [[{"Ref": role_name}]]


def test_buckets_are_encrypted_private_versioned_and_tls_only(template: dict[str, Any]) -> None:
    buckets = _resources(template, "AWS::S3::Bucket")
    policies = {p["Properties"]["Bucket"]["Ref"]: p["Properties"]["PolicyDocument"]["Statement"]
                for p in _resources(template, "AWS::S3::BucketPolicy").values()}
    assert "Bucket" in buckets
    for name, bucket in buckets.items():
        props = bucket["Properties"]
        rule = props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
        assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("AES256", "aws:kms"), name
        assert all(props["PublicAccessBlockConfiguration"].values()) and len(props["PublicAccessBlockConfiguration"]) == 4
        assert props["VersioningConfiguration"]["Status"] == "Enabled", name
        assert bucket.get("DeletionPolicy") == "Retain", f"{name}: deleting the stack must not delete the runs"
        tls = [st for st in policies[name] if st["Effect"] == "Deny"
               and st.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false"]
        assert tls and tls[0]["Principal"] == "*" and tls[0]["Action"] == "s3:*", f"{name}: no TLS-only policy"
        assert {_render(r) for r in tls[0]["Resource"]} == {f"${{{name}.Arn}}", f"${{{name}.Arn}}/*"}
    assert buckets["Bucket"]["Properties"]["LoggingConfiguration"]["DestinationBucketName"] == {"Ref": "AccessLogBucket"}


def _checkov() -> str | None:
    return os.environ.get("CHECKOV") or shutil.which("checkov")


@pytest.mark.skipif(_checkov() is None, reason="checkov not found: install it apart from the project "
                    "(python -m venv /tmp/checkov-venv && /tmp/checkov-venv/bin/pip install checkov) and put it "
                    "on PATH or set CHECKOV=/tmp/checkov-venv/bin/checkov")
def test_checkov_finds_nothing_unexplained() -> None:
    proc = subprocess.run([str(_checkov()), "-f", str(TEMPLATE), "--framework", "cloudformation", "--skip-download",
                           "-o", "json"], capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout)
    summary = report["summary"]
    failed = [(c["check_id"], c["resource"]) for c in report["results"].get("failed_checks", [])]
    assert summary["parsing_errors"] == 0 and summary["failed"] == 0, failed
    assert summary["passed"] > 0
    for check in report["results"].get("skipped_checks", []):  # every skip says why
        assert len((check.get("check_result") or {}).get("suppress_comment", "")) > 20, check["check_id"]


# -- Prometheus --------------------------------------------------------------------------------------------

def test_prometheus_scrapes_every_ray_node_through_rays_discovery_file() -> None:
    cfg = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    assert set(jobs) == {"ray", "prometheus"}
    (sd,) = jobs["ray"]["file_sd_configs"]
    # Ray (ray._private.ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE) links this file into its temp dir
    assert sd["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    ray_constants = (Path(importlib.util.find_spec("ray").origin).parent / "_private" / "ray_constants.py").read_text()
    assert 'PROMETHEUS_SERVICE_DISCOVERY_FILE = "prom_metrics_service_discovery.json"' in ray_constants
    assert "static_configs" not in jobs["ray"], "nodes come and go: discovery only"


# -- Dashboards --------------------------------------------------------------------------------------------

# PromQL words that are not metric names: functions are recognised by the "(" after them.
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                 "unless", "inf", "nan", "le"}
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (Grafana's label_values(metric, label) included)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    text = re.sub(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*,[^)]*\)", r"\1", text)  # label_values(m, label) -> m
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors, $__rate_interval
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # other Grafana variables
    names = set()
    for m in _IDENT.finditer(text):
        word, rest = m.group(), text[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in _PROMQL_WORDS:
            continue  # a function, or a keyword
        if m.start() and (text[m.start() - 1].isdigit() or text[m.start() - 1] == "."):
            continue  # the exponent of a number such as 1e-9
        names.add(word)
    return names


def _family(name: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", name)


def ray_metric_names() -> set[str]:
    lines = (MONITORING / "ray_metrics.txt").read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


_DEFINITION = re.compile(r"\b(?:metrics\.)?(Counter|Gauge|Histogram)\(\s*[\"']([a-zA-Z_:][\w:]*)[\"']")


def project_metric_names() -> set[str]:
    """What Prometheus sees of the metrics ray_qlora defines with ray.util.metrics / ray.serve.metrics.

    Ray prefixes every user metric's name with ``ray_``, whatever it starts with (``qlora_requests``
    is scraped as ``ray_qlora_requests_total``, and a name defined as ``ray_x`` would show as
    ``ray_ray_x``; seen by scrape_ray_metrics.py), counters get ``_total``, histograms
    ``_bucket``/``_sum``/``_count``, gauges nothing.
    """
    names = set()
    for path in (ROOT / "ray_qlora").rglob("*.py"):
        for kind, name in _DEFINITION.findall(path.read_text()):
            exported = "ray_" + name  # unconditionally: Ray's exporter namespace, not a check for a prefix
            if kind == "Counter":
                names.add(exported + "_total")
            elif kind == "Histogram":
                names.update(exported + s for s in ("_bucket", "_sum", "_count"))
            else:
                names.add(exported)
    return names


def _known() -> set[str]:
    return {_family(n) for n in ray_metric_names() | project_metric_names()}


def _queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable of a Grafana dashboard."""
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dashboard.get("panels", [])):
        for t in p.get("targets", []):
            yield f"panel {p.get('title')!r}", t["expr"]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]
            yield f"variable {var['name']!r}", q["query"] if isinstance(q, dict) else q


def unknown_metrics(dashboard: dict[str, Any], known: set[str]) -> list[str]:
    return [f"{where}: {name}" for where, expr in _queries(dashboard)
            for name in sorted(promql_metric_names(expr)) if _family(name) not in known]


def test_promql_metric_names_are_extracted() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, route) (rate(ray_serve_http_request_latency_ms_bucket'
            '{application=~"$application", route!="/x"}[$__rate_interval]))) / clamp_min(sum(rate(foo_total[5m])), 1e-9)'
            ' * 1024 + on (ip) group_left(GpuIndex) ray_node_gram_used')
    assert promql_metric_names(expr) == {"ray_serve_http_request_latency_ms_bucket", "foo_total", "ray_node_gram_used"}
    assert promql_metric_names("label_values(ray_actors, State)") == {"ray_actors"}
    assert promql_metric_names('count(up{job="ray"} == 1)') == {"up"}


def test_ray_metric_list_is_from_the_installed_ray() -> None:
    header = (MONITORING / "ray_metrics.txt").read_text().splitlines()[0]
    version = importlib.metadata.version("ray")
    assert f"Ray {version} " in header, (f"ray_metrics.txt was scraped from another Ray ({header!r}); run "
                                         "infra/monitoring/scrape_ray_metrics.py with Ray " + version)
    names = ray_metric_names()
    assert {"ray_serve_num_http_requests_total", "ray_node_gram_used", "ray_actors"} <= names
    assert not {n for n in names if "qlora" in n}, "the project's own names come from the code, not this list"


def test_project_metrics_are_read_from_the_code() -> None:
    names = project_metric_names()
    assert {"ray_qlora_requests_total", "ray_qlora_loaded_adapters",
            "ray_qlora_time_to_first_token_seconds_bucket",  # Serve (ray_qlora/serve/deployment.py)
            "ray_qlora_trial_eval_loss", "ray_qlora_trial_tokens_per_second", "ray_qlora_trial_peak_memory_gib",
            "ray_qlora_trial_step"} <= names  # Tune trials (ray_qlora/train.py)
    # defined as qlora_*: a definition named ray_qlora_* would be exported twice prefixed
    assert all(n.startswith("ray_qlora_") for n in names), sorted(names)


def test_dashboards_exist() -> None:
    assert {p.name for p in DASHBOARDS} >= {"training.json", "serving.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_a_grafana_dashboard(path: Path) -> None:
    dash = json.loads(path.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert panels and len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
    used = " ".join(expr for _, expr in _queries(dash))
    for name in variables:
        assert name == "datasource" or f"${name}" in used, f"variable {name} is defined but no query uses it"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_queries_only_metrics_that_are_exported(path: Path) -> None:
    dash = json.loads(path.read_text())
    assert any(promql_metric_names(expr) for _, expr in _queries(dash))
    missing = unknown_metrics(dash, _known())
    assert not missing, ("metrics that neither Ray (infra/monitoring/ray_metrics.txt) nor ray_qlora/ "
                         "exports:\n" + "\n".join(missing))


def test_a_typo_in_a_dashboard_metric_is_caught() -> None:
    dash = json.loads((MONITORING / "dashboards" / "serving.json").read_text())
    text = json.dumps(dash).replace("ray_serve_num_http_requests_total", "ray_serve_num_http_request_total")
    missing = unknown_metrics(json.loads(text), _known())
    assert missing and all(m.endswith("ray_serve_num_http_request_total") for m in missing)


# -- Bucket bootstrap --------------------------------------------------------------------------------------

def _bootstrap_module() -> Any:
    spec = importlib.util.spec_from_file_location("bootstrap_bucket", INFRA / "bootstrap_bucket.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bootstrap_creates_the_bucket_and_prefixes_once(local_s3: Any) -> None:
    import boto3

    boot = _bootstrap_module()
    first = boot.bootstrap("s3://infra-bootstrap/team/ray-qlora/")
    assert first["created_bucket"] and first["created_prefixes"] == ["raw", "runs", "adapters"]
    assert first["output_uri"] == "s3://infra-bootstrap/team/ray-qlora"
    again = boot.bootstrap("s3://infra-bootstrap/team/ray-qlora")
    assert not again["created_bucket"] and again["created_prefixes"] == []

    s3 = boto3.client("s3", endpoint_url=local_s3.endpoint_url)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="infra-bootstrap")["Contents"]}
    assert {"team/ray-qlora/raw/", "team/ray-qlora/runs/", "team/ray-qlora/adapters/"} <= keys
    enc = s3.get_bucket_encryption(Bucket="infra-bootstrap")["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert enc["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    assert s3.get_bucket_versioning(Bucket="infra-bootstrap")["Status"] == "Enabled"
    assert all(s3.get_public_access_block(Bucket="infra-bootstrap")["PublicAccessBlockConfiguration"].values())


def test_bootstrap_cli_refuses_a_missing_bucket_with_no_create(local_s3: Any,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    boot = _bootstrap_module()
    assert boot.main(["s3://infra-not-there/p", "--no-create"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert boot.main(["/local/path"]) == 2
    assert "s3://" in capsys.readouterr().err
