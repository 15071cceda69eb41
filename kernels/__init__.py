"""Fused GPU kernels (Triton) for sampling and selective log-probs, with plain-torch fallbacks."""

from .dispatch import triton_available
from .sampling import SampleOutput, sample, sample_reference

__all__ = ["SampleOutput", "sample", "sample_reference", "triton_available"]
