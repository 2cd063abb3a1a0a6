"""Triton kernels, each beside its plain-torch reference. Installed as minidistill.kernels."""
