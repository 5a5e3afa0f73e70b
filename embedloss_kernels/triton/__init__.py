"""Triton kernels of the ``triton`` backend (launchers live in ``embedloss_kernels.ops.triton_ops``)."""
