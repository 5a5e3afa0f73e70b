"""The ``@triton.jit`` kernels, one module per loss; their launchers are ``embedloss_kernels/backends/triton/<loss>.py``
and their tiles ``embedloss_kernels/heuristics/triton.py``."""
