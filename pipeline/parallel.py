"""DDP / FSDP through Composer's `parallelism_config`, from the `parallelism:` config section."""

from __future__ import annotations

from typing import Optional

import torch
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config
from torch.distributed.device_mesh import init_device_mesh

from pipeline.config import ConfigError, ParallelismConfig

SHARDINGS = ("none", "FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD")


def build_parallelism(cfg: ParallelismConfig, device: str) -> Optional[dict]:
    if cfg.sharding not in SHARDINGS:
        raise ConfigError(f"parallelism.sharding must be one of {SHARDINGS}, got '{cfg.sharding}'")
    if cfg.state_dict_type not in ("sharded", "full"):
        raise ConfigError(f"parallelism.state_dict_type must be sharded or full, got '{cfg.state_dict_type}'")
    if cfg.sharding == "none":
        return None
    if cfg.fsdp_version == 1:
        if not torch.cuda.is_available():
            raise ConfigError("parallelism.fsdp_version=1 needs CUDA; FSDP2 (fsdp_version=2) also runs on CPU")
        return {"fsdp": {"sharding_strategy": cfg.sharding, "state_dict_type": cfg.state_dict_type}}
    mesh = None
    if cfg.sharding == "HYBRID_SHARD":
        # Replicate across nodes, shard within a node.
        dist.initialize_dist(device)
        nodes, per_node = dist.get_world_size() // dist.get_local_world_size(), dist.get_local_world_size()
        mesh_device = "cuda" if device == "gpu" else "cpu"
        mesh = init_device_mesh(mesh_device, (nodes, per_node), mesh_dim_names=("replicate", "shard"))
    return {
        "fsdp": FSDP2Config(
            device_mesh=mesh,
            # SHARD_GRAD_OP keeps parameters gathered between forward and backward (ZeRO-2-like).
            reshard_after_forward=cfg.sharding != "SHARD_GRAD_OP",
            state_dict_type=cfg.state_dict_type,
        )
    }
