"""Build script for embedloss_kernels.

`pip install --no-build-isolation -e .` installs the Python package (torch must already be installed: the
C++ extension is compiled against it). Set EMBEDLOSS_NO_EXT=1 to skip the native build; the package then
runs on its `torch` (and, on CUDA, `triton`) backends.

The extension `embedloss_kernels._C` (the `cpp` backend, csrc/) is built with ninja through
torch.utils.cpp_extension. A failed compile does not fail the install: setup prints a warning and installs the
pure-Python package, which then runs on the `torch` backend (scripts/setup.sh then fails, naming the reason, where a
C++ compiler exists). pyproject.toml holds only the build system, so pip always builds through PEP 517/660.
"""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _supported_versions() -> dict:
    """The constants of embedloss_kernels/core/versions.py, read without importing the package (which needs torch)."""
    namespace: dict = {}
    with open(os.path.join(HERE, "embedloss_kernels", "core", "versions.py")) as f:
        exec(f.read(), namespace)
    return namespace


VERSIONS = _supported_versions()
_TEXT = VERSIONS["as_text"]
_TRITON_LOW, _TRITON_HIGH = VERSIONS["TRITON_RANGE"]
_ST = VERSIONS["SENTENCE_TRANSFORMERS_SERIES"]


def _ext_modules():
    """The `embedloss_kernels._C` extension and its build command, or nothing when EMBEDLOSS_NO_EXT=1."""
    if os.environ.get("EMBEDLOSS_NO_EXT", "0") not in ("", "0"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        print(f"WARNING: embedloss_kernels: torch is not importable ({exc}); skipping the C++ extension.")
        return [], {}

    import glob

    # Relative to this file, so the build works from any working directory.
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), root_dir=HERE, recursive=True))
    flags = ["-O3"]
    link = []
    if torch._C.has_openmp:  # the kernels' `omp simd` loops and at::parallel_for follow torch's threading
        flags.append("-fopenmp")
        link.append("-fopenmp")

    class BuildExtensionOrWarn(BuildExtension.with_options(use_ninja=True)):
        """Build the extension; on failure warn and let the pure-Python package install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler/linker failure
                print(
                    f"WARNING: embedloss_kernels: building the C++ extension failed ({exc}); installing the "
                    "pure-Python package, which runs on the torch backend."
                )

    ext = CppExtension(
        "embedloss_kernels._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=flags,
        extra_link_args=link,
    )
    return [ext], {"build_ext": BuildExtensionOrWarn}


ext_modules, cmdclass = _ext_modules()

setup(
    name="embedloss_kernels",
    version="0.1.0",
    description="Fused, exact, memory-lean contrastive losses (MNRL/InfoNCE, CoSENT, AnglE) for embedding models",
    packages=find_packages(include=["embedloss_kernels", "embedloss_kernels.*"]),
    python_requires=f">={_TEXT(VERSIONS['PYTHON_MIN'])}",
    install_requires=[f"torch>={_TEXT(VERSIONS['TORCH_MIN'])}", "numpy"],
    extras_require={
        # major.minor inclusive ranges from embedloss_kernels/core/versions.py: triton 3.6 (oldest, CI's second job) to
        # 3.9 (newest, the main CI job), sentence-transformers 6.2.x
        "triton": [f"triton>={_TEXT(_TRITON_LOW)},<{_TRITON_HIGH[0]}.{_TRITON_HIGH[1] + 1}"],
        "st": [f"sentence-transformers>={_TEXT(_ST)},<{_ST[0]}.{_ST[1] + 1}"],
        "test": ["pytest", f"sentence-transformers>={_TEXT(_ST)},<{_ST[0]}.{_ST[1] + 1}"],
        "bench": ["tqdm", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
