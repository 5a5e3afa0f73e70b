"""The loss x backend grid: one module per loss in each backend, the same names everywhere.

* ``torch/<loss>.py``: the row-block algorithms in plain PyTorch, on any device (the fallback);
* ``triton/<loss>.py``: the launchers of the Triton kernels in :mod:`embedloss_kernels.kernels` (CUDA, or CPU through
  the interpreter);
* ``cpp``: the C++ extension ``embedloss_kernels._C``, whose CPU kernels are ``csrc/cpu/<loss>_cpu.cpp``.

Each ``<backend>/<loss>.py`` defines ``<loss>_forward`` with the op's schema (``core/contract.py``) and returns the
loss with its gradients; :mod:`embedloss_kernels.ops` registers them as ``embedloss_<backend>::<loss>``. Each backend
answers ``why_not(device)``. Shared below them: ``common`` (normalization, pair similarities, outputs without
gradients) and ``blocked`` (the GPU's row-block gradient products).
"""
