#!/usr/bin/env bash
# One-time (idempotent) setup of a fresh machine: dependencies, then the package with its C++ extension.
# Where torch is already installed (e.g. a GPU machine with its own CUDA build), it is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip --disable-pip-version-check"
if python -c "import torch" 2>/dev/null; then
  grep -v '^torch==' requirements.txt > /tmp/embedloss_requirements.txt
else
  cp requirements.txt /tmp/embedloss_requirements.txt
fi
$PIP install -q -r /tmp/embedloss_requirements.txt
$PIP install -q --no-build-isolation -e .
python -c "import embedloss_kernels as ek; print('embedloss_kernels ready; backends:', ek.available_backends())"
