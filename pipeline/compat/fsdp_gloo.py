"""FSDP2 on gloo: sum, then divide by the data-parallel size (torch 2.7).

FSDP2 averages gradients with ReduceOp.AVG, which gloo (the CPU backend) silently treats as a sum
in reduce-scatter (gradients world_size times too large, measured) and refuses in HSDP's
all-reduce. On gloo, sum and divide by the data-parallel size instead, as FSDP2 itself does for
fp16 (tests/test_parallel.py compares every mode with DDP). NCCL is left alone. torch 2.7's FSDP2
asks a private function how to average; tests/test_layout.py fails loudly if it goes.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp._fully_shard import _fsdp_collectives

_fsdp_divide_factors = _fsdp_collectives._get_gradient_divide_factors  # torch's own, kept for NCCL


def _sum_then_divide_on_gloo(reduce_scatter_group, all_reduce_group, reduce_dtype, device_type=""):
    factors = _fsdp_divide_factors(reduce_scatter_group, all_reduce_group, reduce_dtype, device_type)
    if factors != (None, None) or torch.distributed.get_backend(reduce_scatter_group) != "gloo":
        return factors
    replicas = all_reduce_group.size() if all_reduce_group is not None else 1
    return 1.0, float(reduce_scatter_group.size() * replicas)


def divide_after_summing_on_gloo() -> None:
    _fsdp_collectives._get_gradient_divide_factors = _sum_then_divide_on_gloo
