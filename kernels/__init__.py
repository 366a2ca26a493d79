"""Triton kernels with plain-torch twins (installed as `flashdreams.kernels`)."""
