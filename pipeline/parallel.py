"""DDP / FSDP through Composer's `parallelism_config`, from the `parallelism:` config section."""

from __future__ import annotations

from typing import Optional

import torch
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config
from torch.distributed.device_mesh import init_device_mesh

from pipeline.config import ConfigError, Device, ParallelismConfig, Sharding


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
