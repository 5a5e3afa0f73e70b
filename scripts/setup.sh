#!/usr/bin/env bash
# One-time (idempotent) setup of a fresh machine: dependencies, then the package with its C++ extension.
# Where torch is already installed (e.g. a GPU machine with its own CUDA build), it is left as it is.
# Fails (non-zero) when a C++ compiler is present but the extension did not build (EMBEDLOSS_NO_EXT=1 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
PIP="$PYTHON -m pip --disable-pip-version-check"
if $PYTHON -c "import torch" 2>/dev/null; then
  grep -v '^torch==' requirements.txt > /tmp/embedloss_requirements.txt
else
  cp requirements.txt /tmp/embedloss_requirements.txt
fi
$PIP install -q -r /tmp/embedloss_requirements.txt
# pyproject.toml makes this the PEP 660 path; --no-build-isolation builds against the torch installed above.
$PIP install -q --no-build-isolation -e .
# The SigLIP/CLIP tests' oracle: OpenCLIP 3.3.0's own loss.py, read from its wheel (downloaded, never installed:
# `import open_clip` needs a torchvision that matches torch). Optional: the tests skip, saying why, without it.
if ! ls .cache/open_clip/open_clip_torch-3.3.0-*.whl >/dev/null 2>&1; then
  $PIP download -q --no-deps open-clip-torch==3.3.0 -d .cache/open_clip \
    || echo "WARNING: could not download open-clip-torch==3.3.0; tests/test_siglip.py will skip its OpenCLIP checks" >&2
fi
$PYTHON -c "import embedloss_kernels as ek; print('embedloss_kernels ready; backends:', ek.available_backends())"
if [ "${EMBEDLOSS_NO_EXT:-0}" = "0" ]; then  # as setup.py: unset, empty or 0 means build it
  if command -v "${CXX:-c++}" >/dev/null 2>&1; then
    if ! $PYTHON -c "import sys, embedloss_kernels as ek; sys.exit('cpp' not in ek.available_backends('cpu'))"; then
      why=$($PYTHON -c "from embedloss_kernels import dispatch; print(dispatch.why_not('cpp', 'cpu'))")
      echo "ERROR: a C++ compiler (${CXX:-c++}) is here but the C++ extension did not build or load: $why" >&2
      echo "       rerun '$PIP install --no-build-isolation -e .' without -q for the compiler output;" >&2
      echo "       set EMBEDLOSS_NO_EXT=1 to install without it on purpose." >&2
      exit 1
    fi
  fi
fi
