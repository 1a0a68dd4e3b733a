"""What the GPU check carries: the slimmed bitsandbytes wheel still installs, and its pins are supported ones.

The bundle itself is built from PyPI (``make gpu-bundle``) and run on the device; here, without the
network, the parts that could silently break it.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
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


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    """A minimal wheel of a package named bitsandbytes, with a RECORD that hashes every file."""
    info = "bitsandbytes-0.0.1.dist-info"
    files = {**files, f"{info}/METADATA": b"Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.0.1\n",
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}

    def digest(data: bytes) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    record = "".join(f"{name},sha256={digest(data)},{len(data)}\n" for name, data in files.items())
    record += f"{info}/RECORD,,\n"
    out = path / "bitsandbytes-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
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
