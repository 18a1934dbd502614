"""DDP / FSDP through Composer's `parallelism_config`, from the `parallelism:` config section."""

from __future__ import annotations

from typing import Optional

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from pipeline.config import ConfigError, Device, ParallelismConfig, Sharding


class GlooShardedGradientMean(Algorithm):
    """FSDP2 reduce-scatters gradients with ReduceOp.AVG; gloo (the CPU backend) sums instead, so on
    CPU every sharded gradient arrives world_size times too large (measured: exactly 2x on 2 ranks;
    tests/test_parallel.py compares each mode with DDP). Divides them once per batch, after the
    micro-batches' gradients are summed and before clipping and the optimizer step. NCCL averages
    correctly and is left alone."""

    def match(self, event: Event, state: State) -> bool:
        return event == Event.AFTER_TRAIN_BATCH and torch.distributed.get_backend() == "gloo"

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        for param in state.model.parameters():
            if param.grad is not None and isinstance(param.grad, DTensor):
                param.grad.div_(dist.get_world_size())


def sharded_gradient_fixes(cfg: ParallelismConfig) -> list:
    """Algorithms that must run first at AFTER_TRAIN_BATCH for this parallelism."""
    return [GlooShardedGradientMean()] if cfg.sharding != Sharding.ddp and cfg.fsdp_version == 2 else []


def build_parallelism(cfg: ParallelismConfig, device: Device) -> Optional[dict]:
    """None for DDP (Composer wraps the model itself when there is more than one rank)."""
    if cfg.sharding == Sharding.ddp:
        return None
    state_dict_type = cfg.state_dict_type.value
    if cfg.fsdp_version == 1:
        if not torch.cuda.is_available():
            raise ConfigError("parallelism.fsdp_version=1 needs CUDA; FSDP2 (fsdp_version=2) also runs on CPU")
        return {"fsdp": {"sharding_strategy": cfg.sharding.value, "state_dict_type": state_dict_type}}
    mesh = None
    if cfg.sharding == Sharding.HYBRID_SHARD:
        # Replicate across nodes, shard within a node.
        dist.initialize_dist(device.value)
        nodes, per_node = dist.get_world_size() // dist.get_local_world_size(), dist.get_local_world_size()
        mesh_device = "cuda" if device == Device.gpu else "cpu"
        mesh = init_device_mesh(mesh_device, (nodes, per_node), mesh_dim_names=("replicate", "shard"))
    return {
        "fsdp": FSDP2Config(
            device_mesh=mesh,
            # SHARD_GRAD_OP keeps parameters gathered between forward and backward (ZeRO-2-like).
            reshard_after_forward=cfg.sharding != Sharding.SHARD_GRAD_OP,
            state_dict_type=state_dict_type,
        )
    }
