"""lasp: Linear Attention Sequence Parallel for PyTorch.

Fused kernels for causal linear attention with per-head decay, and the LASP state ring that splits a
sequence over the ranks of a torch.distributed group while passing only a d x e state between them.
"""
from ._ops import (alibi_slopes, get_ring_transport, get_value_checks, lasp_attention, set_group_checks,
                   set_ring_transport, set_value_checks)
from . import distributed, models, nn, scaling  # noqa: E402  (after the op is loaded)
from .delta import gated_delta_attention  # noqa: E402

__version__ = "0.1.0"
__all__ = ["lasp_attention", "gated_delta_attention", "alibi_slopes", "set_group_checks", "set_ring_transport", "get_ring_transport", "set_value_checks", "get_value_checks", "nn", "models", "distributed", "scaling"]
