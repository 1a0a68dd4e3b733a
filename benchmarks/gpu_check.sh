#!/usr/bin/env bash
# The GPU check, as one command on the lent device machine (no network there):
#   1. install the wheels `python benchmarks/gpu_bundle.py` put in .gpu-bundle/ (offline, into /tmp/site),
#      and check the image holds what they need and the bundle cannot carry (pyarrow >= 19);
#   2. tests/test_gpu.py and tests/test_lora.py (their CUDA tests skip elsewhere);
#   3. benchmarks/train_throughput.py: today's trial path vs the defaults, real tokens/s, peak memory, MFU.
# Without CUDA (a rehearsal here) the CUDA tests skip and the benchmark runs its tiny CPU shape.
# Logs go to $OUT (the device tool brings that folder back), else to /tmp/gpu-check.
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${GPU_BUNDLE:-.gpu-bundle}
OUT=${OUT:-/tmp/gpu-check}
SITE=${GPU_SITE:-/tmp/site}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
# No wheels at all (never built, or a build whose download failed): one line, not pip's error on '*.whl'.
compgen -G "$BUNDLE/wheels/*.whl" >/dev/null \
    || { echo "gpu_check: no wheels in $BUNDLE/wheels; run python benchmarks/gpu_bundle.py first" >&2; exit 2; }
BUNDLE=$(cd "$BUNDLE" && pwd)

"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$BUNDLE"/wheels/*.whl 2>&1 | tee "$OUT/install.log" || exit 1
# The bundle's packages shadow the image's older ones; the repository runs from its folder, not installed.
export PYTHONPATH="$SITE:$PWD" RAY_QLORA_CACHE="$BUNDLE/cache" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1
"$PY" - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import importlib.metadata as md, platform, torch
names = ["torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate", "pydantic",
         "liger-kernel", "triton", "pyarrow", "huggingface_hub", "tokenizers"]
found = {}
for n in names:
    try:
        found[n] = md.version(n)
    except md.PackageNotFoundError:
        found[n] = "-"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"python {platform.python_version()}  gpu {gpu}  " + "  ".join(f"{k} {v}" for k, v in found.items()))
EOF
# What the bundle cannot carry must be on the image: say so in one line, before the tests spend device time.
"$PY" benchmarks/gpu_bundle.py --check-image 2>&1 | tee "$OUT/check_image.log" || exit 2

status=0
timeout "${TEST_TIMEOUT_S:-180}" "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_lora.py 2>&1 \
    | tee "$OUT/test_gpu.log" || status=1
timeout "${BENCH_TIMEOUT_S:-360}" "$PY" benchmarks/train_throughput.py "$@" 2>&1 \
    | tee "$OUT/train_throughput.log" || status=1
exit $status
