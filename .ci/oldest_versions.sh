#!/usr/bin/env bash
# CI, second job: the oldest versions the package supports, those of the GPU image (torch 2.11, triton 3.6), on CPU.
# Runs the Triton interpreter tests, the full compile_check (sm_80/sm_90 compiles and ptxas: no GPU needed) and the
# distributed tests there, so an API that only newer torch/triton has, or a ptxas failure of triton 3.6, fails CI.
# The venv lives outside the clone and is reused while its versions are right (created when missing: ~1.5 min,
# 4.6 GB; PyPI's torch 2.11.0 is the CUDA build, which runs on CPU). The package is built from a copy of this tree
# and installed into the venv (its C++ extension compiled against torch 2.11), and the tests import that install.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${EMBEDLOSS_CI_VENV:-$HOME/.cache/embedloss_ci/venv-t211}"
# torchvision 0.26 is the one built for torch 2.11: with it `import open_clip` works here (never in the main job's
# environment, whose CPU-only torch cannot load PyPI's torchvision), so tests/test_open_clip_real.py runs here.
PINS=(torch==2.11.0 triton==3.6.0 "numpy<2.4" pytest sentence-transformers==6.2.0 ninja "setuptools>=64" wheel
      torchvision==0.26.0 open-clip-torch==3.3.0)

venv_ok() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import sys

want = {"torch": "2.11.0", "triton": "3.6.0", "sentence-transformers": "6.2.0", "torchvision": "0.26.0",
        "open-clip-torch": "3.3.0"}
try:
    got = {name: md.version(name).split("+")[0] for name in [*want, "numpy", "pytest", "ninja", "wheel"]}
except md.PackageNotFoundError as exc:
    sys.exit(f"venv lacks {exc}")
numpy = tuple(int(p) for p in got["numpy"].split(".")[:2])
if any(got[n] != v for n, v in want.items()) or numpy >= (2, 4):
    sys.exit(f"venv has {got}")
PY
}

start=$SECONDS
if ! venv_ok; then
  if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV"
  fi
  echo "== installing into $VENV: ${PINS[*]}"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PINS[@]}"
  venv_ok
fi
echo "== venv ready ($((SECONDS - start)) s): $("$VENV/bin/python" -c 'import torch, triton, numpy; print("torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__)')"

# Build and install from a clean copy (no build/ or .so of the main job's environment), the way a user installs.
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
tar -C "$ROOT" --exclude=./build --exclude=./.git --exclude='*.so' --exclude='*.egg-info' -cf - . | tar -C "$WORK" -xf -
mkdir "$WORK/src" && mv "$WORK"/{embedloss_kernels,csrc,setup.py,pyproject.toml} "$WORK/src/"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps "$WORK/src"
cd "$WORK"  # nothing importable here: the tests see the venv's install, not the clone's package
"$VENV/bin/python" -c "import embedloss_kernels as ek; print('installed', ek.__file__, ek.available_backends())"
if command -v "${CXX:-c++}" >/dev/null 2>&1; then
  "$VENV/bin/python" -c "import sys, embedloss_kernels as ek; sys.exit('cpp' not in ek.available_backends('cpu'))" \
    || { echo "ERROR: the C++ extension did not build against torch 2.11" >&2; exit 1; }
fi
TESTS=("$WORK/tests/test_triton.py" "$WORK/tests/test_compile_check.py" "$WORK/tests/test_distributed.py"
       "$WORK/tests/test_open_clip_real.py")
"$VENV/bin/python" -m pytest "${TESTS[@]}" -q -p no:cacheprovider
# the Matryoshka and GIST Triton ops (their kernels through triton 3.6's interpreter): a small selection of their tests
MG_TESTS=("$WORK/tests/test_matryoshka.py" "$WORK/tests/test_gist.py")
MG_SELECTION="triton and (test_functional_matches_reference or test_opcheck or test_half_precision_inputs"
MG_SELECTION+=" or test_triton_single_candidate_rows or test_matches_sentence_transformers_every_option"
MG_SELECTION+=" or test_threshold_is_strict)"
"$VENV/bin/python" -m pytest "${MG_TESTS[@]}" -k "$MG_SELECTION" -q -p no:cacheprovider
echo "== oldest-versions job: $((SECONDS - start)) s"
