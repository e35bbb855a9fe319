"""Numerical parity against fixtures produced by the original PyTorch code (`python -m cosyjax.parity ROOT`)."""
