"""Fused kernels (Triton) for sampling and selective log-probs, with plain-torch fallbacks.

Public entry points dispatch per call (see ``dispatch.triton_available``): Triton where it can
run (CUDA, or the CPU interpreter under ``TRITON_INTERPRET=1``), the torch path otherwise.
"""

from .dispatch import triton_available
from .logprobs import (
    fused_linear_selective_log_softmax,
    fused_linear_selective_log_softmax_reference,
    selective_log_softmax,
    selective_log_softmax_reference,
)
from .sampling import SampleOutput, sample, sample_reference

__all__ = [
    "SampleOutput",
    "fused_linear_selective_log_softmax",
    "fused_linear_selective_log_softmax_reference",
    "sample",
    "sample_reference",
    "selective_log_softmax",
    "selective_log_softmax_reference",
    "triton_available",
]
