"""DDP / FSDP through Composer's `parallelism_config`, from the `parallelism:` config section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config

from pipeline.config.schema import ConfigError, ParallelismConfig, Sharding


@dataclass
class HybridShardConfig(FSDP2Config):
    """FSDP2 over a 2-D (replicate, shard) mesh. Composer builds the mesh from these two degrees,
    named so that its checkpointing saves from the first replica only and loads once per replica;
    a 2-D `device_mesh` given to a plain FSDP2Config is replaced by a 1-D one (full sharding)."""

    replicas: int = 1

    @property
    def data_parallel_replicate_degree(self) -> Optional[int]:
        return self.replicas

    @property
    def data_parallel_shard_degree(self) -> int:
        return -1  # the rest of the world


def build_parallelism(cfg: ParallelismConfig) -> Optional[dict]:
    """None for DDP (Composer wraps the model itself when there is more than one rank)."""
    if cfg.sharding == Sharding.ddp:
        return None
    state_dict_type = cfg.state_dict_type.value
    if cfg.fsdp_version == 1:
        if not torch.cuda.is_available():
            raise ConfigError("parallelism.fsdp_version=1 needs CUDA; FSDP2 (fsdp_version=2) also runs on CPU")
        return {"fsdp": {"sharding_strategy": cfg.sharding.value, "state_dict_type": state_dict_type}}
    # SHARD_GRAD_OP keeps parameters gathered between forward and backward (ZeRO-2-like).
    options = {"reshard_after_forward": cfg.sharding != Sharding.SHARD_GRAD_OP, "state_dict_type": state_dict_type}
    if cfg.sharding != Sharding.HYBRID_SHARD:
        return {"fsdp": FSDP2Config(**options)}
    # Shard within a node (or within shard_size ranks), replicate across them.
    world, shard_size = dist.get_world_size(), cfg.shard_size or dist.get_local_world_size()
    if world % shard_size:
        raise ConfigError(f"parallelism.shard_size={shard_size} does not divide the world size {world}")
    replicas = world // shard_size
    if replicas == 1:  # one replica: plain FSDP over the 1-D mesh (a 2-D one of size 1 x n fails on CPU)
        return {"fsdp": FSDP2Config(**options)}
    if not torch.cuda.is_available():
        raise ConfigError(
            f"parallelism.sharding=HYBRID_SHARD with {replicas} replicas needs GPUs: torch 2.7's FSDP2 cannot "
            f"all-reduce across replicas on CPU. On CPU use FULL_SHARD, or parallelism.shard_size={world}."
        )
    return {"fsdp": HybridShardConfig(replicas=replicas, **options)}
