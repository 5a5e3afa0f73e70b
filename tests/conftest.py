"""Shared fixtures: the backend parametrization every equivalence test runs over."""

import os

import pytest
import torch

# On a machine without CUDA, the Triton backend runs through the interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import embedloss_kernels.dispatch as backends  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend_params():
    return [pytest.param(name, id=name) for name in backends.BACKEND_NAMES]


@pytest.fixture(params=backend_params())
def backend(request):
    """Each backend in turn, skipped (with the reason) where it cannot run on DEVICE."""
    reason = backends.why_not(request.param, DEVICE)
    if reason is not None:
        pytest.skip(f"backend {request.param} unavailable on {DEVICE}: {reason}")
    return request.param


def is_interpreted(backend_name: str) -> bool:
    """Triton through the interpreter is slow: tests keep its shapes small."""
    return backend_name == "triton" and DEVICE.type == "cpu"
