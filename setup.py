"""Build script for embedloss_kernels.

`pip install --no-build-isolation -e .` installs the Python package (torch must already be installed: the
C++ extension is compiled against it). Set EMBEDLOSS_NO_EXT=1 to skip the native build; the package then
runs on its `torch` (and, on CUDA, `triton`) backends.
"""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _ext_modules():
    # The C++ extension (csrc/) is added by the C++ backend; see csrc/README if present.
    return [], {}


ext_modules, cmdclass = _ext_modules()

setup(
    name="embedloss_kernels",
    version="0.1.0",
    description="Fused, exact, memory-lean contrastive losses (MNRL/InfoNCE, CoSENT, AnglE) for embedding models",
    packages=find_packages(include=["embedloss_kernels", "embedloss_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "st": ["sentence-transformers>=6.2"],
        "test": ["pytest", "sentence-transformers==6.2.0"],
        "bench": ["tqdm", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
