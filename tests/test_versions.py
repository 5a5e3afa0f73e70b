"""Supported versions are stated once (embedloss_kernels/core/versions.py) and agree in setup.py, requirements.txt, the
code's checks and the README."""

import os
import re
import runpy
import sys
from pathlib import Path
from unittest import mock

import setuptools

from embedloss_kernels.core import versions as _versions
from embedloss_kernels.core.versions import as_text, major_minor

ROOT = Path(__file__).resolve().parent.parent


def setup_kwargs() -> dict:
    captured = {}
    with mock.patch.object(setuptools, "setup", lambda **kw: captured.update(kw)), \
            mock.patch.dict(os.environ, {"EMBEDLOSS_NO_EXT": "1"}), mock.patch.object(sys, "argv", ["setup.py"]):
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return captured


def upper_bound(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1] + 1}"


def test_setup_py_uses_the_supported_versions():
    kw = setup_kwargs()
    assert kw["python_requires"] == f">={as_text(_versions.PYTHON_MIN)}"
    assert f"torch>={as_text(_versions.TORCH_MIN)}" in kw["install_requires"]
    low, high = _versions.TRITON_RANGE
    assert kw["extras_require"]["triton"] == [f"triton>={as_text(low)},<{upper_bound(high)}"]
    st = _versions.SENTENCE_TRANSFORMERS_SERIES
    assert kw["extras_require"]["st"] == [f"sentence-transformers>={as_text(st)},<{upper_bound(st)}"]


def test_requirements_pin_versions_inside_the_supported_ranges():
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    pins = dict(re.match(r"([A-Za-z0-9_.-]+)(.*)", line).groups() for line in lines if line)
    assert major_minor(pins["torch"].lstrip("=")) >= _versions.TORCH_MIN
    low, high = _versions.TRITON_RANGE
    assert pins["triton"] == f">={as_text(low)},<{upper_bound(high)}"
    assert major_minor(pins["sentence-transformers"].lstrip("=")) == _versions.SENTENCE_TRANSFORMERS_SERIES


def test_code_checks_use_the_supported_versions():
    from embedloss_kernels.backends import triton as triton_backend

    assert triton_backend.TRITON_RANGE == _versions.TRITON_RANGE
    assert major_minor("2.13.0+cpu") == (2, 13) and major_minor("3.10.0rc1") == (3, 10) and major_minor("6") == (6, 0)


def test_readme_states_the_supported_versions():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Supported versions"):]
    table = table[: table.index("\n## ", 3)]
    low, high = _versions.TRITON_RANGE
    assert f"| Python | ≥ {as_text(_versions.PYTHON_MIN)} |" in table
    assert f"| torch | ≥ {as_text(_versions.TORCH_MIN)} |" in table
    assert f"| {as_text(low)} – {as_text(high)} |" in table
    assert f"| {as_text(_versions.SENTENCE_TRANSFORMERS_SERIES)}.x |" in table
