#!/usr/bin/env bash
# The GPU check of issues 11, 12, 13 and 22 in one device call (at most ~9.5 minutes: the time boxes below add up to
# 560 s): install the carried wheels, run the CUDA test suite, time every provider (benchmarks/gpu_sweep.py), the
# fused Matryoshka loss against our plain MNRL (benchmarks/interleaved.py), then SigLIP and CLIP (our OpenCLIP
# drop-ins against OpenCLIP 3.3.0's own loss.py and the floor, B=N=16384, D=1024, bf16; its table goes to this log). Every stage runs
# under `timeout`, so a hang costs its own box and no more; results land in $OUT (or benchmarks/out/gpu): tests.log,
# sweep.csv, results.json, sweep.png and this script's log.
#
# From a session with a device (the device tool's `run`; wheels fetched beforehand into the git-ignored .whl/):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl inf-cl==1.2.1 sentence-transformers==6.2.0
#   python3 -m pip download --no-deps open-clip-torch==3.3.0 -d .cache/open_clip      # (scripts/setup.sh does this)
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".cache"], timeout_s=600)
# Without a GPU, `bash benchmarks/gpu_check.sh --dry-run` runs every stage on tiny CPU shapes (code paths only).
set -u
OUT="${OUT:-$(cd "$(dirname "$0")/.." && pwd)/benchmarks/out/gpu}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
DRY=""
[ "${1:-}" = "--dry-run" ] && DRY="--dry-run"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stamp() { echo "== $(date -u +%T) $*"; }

stamp "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    stamp "install carried wheels"
    timeout 30 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 - <<'PY'
import torch, triton
print("torch", torch.__version__, "| triton", triton.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for mod in ("sentence_transformers", "inf_cl", "embedloss_kernels"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "installed"), m.__file__)
    except ImportError as exc:
        print(mod, "MISSING:", exc)
PY

if [ -z "$DRY" ]; then
    stamp "CUDA test suite (box 120 s; compile_check is CPU work and runs in CI)"
    timeout 120 python3 -m pytest tests/test_blocked.py tests/test_triton.py tests/test_equivalence.py tests -v --maxfail=10 -p no:cacheprovider \
        --deselect tests/test_compile_check.py::test_compile_check_compiles_every_kernel_and_variant_without_spills \
        > "$OUT/tests.log" 2>&1
    echo "pytest exit $? (124 = time box hit; per-test lines in tests.log)"; grep -c PASSED "$OUT/tests.log"; grep -E "FAILED|ERROR" "$OUT/tests.log" | head -20; tail -3 "$OUT/tests.log"
fi

rm -f "$OUT"/{sweep,precision,large,cosent}.jsonl
stamp "sweep (box 160 s)";     timeout 160 python3 benchmarks/gpu_sweep.py sweep --out "$OUT" --budget 0.4 --max-reps 5 $DRY; echo "exit $?"
stamp "B=N=262144 (box 80 s)"; timeout 80 python3 benchmarks/gpu_sweep.py large --out "$OUT" --budget 1 $DRY; echo "exit $?"
stamp "CoSENT 1M (box 30 s)";  timeout 30 python3 benchmarks/gpu_sweep.py cosent --out "$OUT" --budget 0.5 $DRY; echo "exit $?"
stamp "precision (box 40 s)";  timeout 40 python3 benchmarks/gpu_sweep.py precision --out "$OUT" $DRY; echo "exit $?"
stamp "Matryoshka (box 40 s)"
if [ -z "$DRY" ]; then
    MAT="--device cuda --dtype bfloat16 --batch 16384 --dim 1024 --negatives 0 --matryoshka-dims 1024 512 256 128 64 --rounds 5"
else
    MAT="--device cpu --batch 64 --dim 96 --negatives 0 --matryoshka-dims 96 48 16 --rounds 1"
fi
timeout 40 python3 benchmarks/interleaved.py --loss matryoshka $MAT --providers ours ours-mnrl --out "$OUT"; echo "exit $?"
stamp "SigLIP / CLIP (box 60 s)"
if [ -z "$DRY" ]; then
    SIG="--device cuda --dtype bfloat16 --siglip-batch-sizes 16384 --dim 1024 --repeats 3 --backends triton"
else
    SIG="--device cpu --siglip-batch-sizes 64 --dim 32 --repeats 1 --backends torch"
fi
(cd benchmarks && timeout 60 python3 throughput.py --losses siglip clip $SIG --timeout 15 --out /tmp/siglip_gpu \
    | grep -v "^measuring"); echo "exit $?"
stamp "summary"
timeout 30 python3 benchmarks/gpu_sweep.py summarize --out "$OUT"
[ -s "$OUT/results.json" ] && rm -f "$OUT"/*.jsonl  # folded into results.json (files back from a device call are limited to 8)
stamp "done"
