"""A tiny CLIP, a synthetic batch source and a Composer Trainer around them, for algorithm tests."""

from __future__ import annotations

import open_clip
import torch
from composer import Callback, Trainer
from composer.core import State
from composer.loggers import Logger
from composer.utils import dist, reproducibility
from torch.utils.data import DataLoader, TensorDataset

from pipeline.config.schema import LossName, ModelConfig
from pipeline.model.clip import CLIPModel, build_clip

TINY = ModelConfig(
    name="tiny-test",
    custom={
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
)
TINY_SIGLIP = ModelConfig(name=TINY.name, custom=TINY.custom, loss=LossName.siglip)
NUM_PATCHES = (32 // 4) ** 2


TOKENIZER = open_clip.SimpleTokenizer(context_length=16)  # the tiny model's tokenizer


def tiny_model(seed: int = 0, cfg: ModelConfig = TINY) -> CLIPModel:
    reproducibility.seed_all(seed)
    return CLIPModel(build_clip(cfg)[0], cfg)


def synthetic_dataset(num_samples: int = 64, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num_samples, 3, 32, 32, generator=generator)
    words = ["red", "blue", "cat", "dog", "shoe", "bag", "tree", "car"]
    captions = [f"a photo of a {words[i % 8]} {words[(i // 8) % 8]} number {i}" for i in range(num_samples)]
    return TensorDataset(images, open_clip.tokenize(captions, context_length=16), torch.arange(num_samples))


def synthetic_loader(batch_size: int, num_samples: int = 64) -> DataLoader:
    dataset = synthetic_dataset(num_samples)
    sampler = dist.get_sampler(dataset, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True)


class GradCapture(Callback):
    """Loss and every parameter gradient of each batch, taken before the optimizer step."""

    def __init__(self):
        self.grads, self.losses = [], []

    def after_train_batch(self, state: State, logger: Logger) -> None:
        self.losses.append(float(state.loss.detach()) if torch.is_tensor(state.loss) else None)
        self.grads.append({n: p.grad.detach().clone() for n, p in state.model.named_parameters() if p.grad is not None})


def make_trainer(model: CLIPModel, batch_size: int = 16, **kwargs) -> Trainer:
    from pipeline.algorithms import ContrastiveAccumulation

    exact = [ContrastiveAccumulation()] if kwargs.pop("exact_accumulation", True) else []
    algorithms = [*exact, *kwargs.pop("algorithms", [])]
    return Trainer(
        model=model,
        train_dataloader=kwargs.pop("train_dataloader", None) or synthetic_loader(batch_size),
        optimizers=kwargs.pop("optimizers", None) or torch.optim.SGD(model.parameters(), lr=kwargs.pop("lr", 0.1)),
        max_duration=kwargs.pop("max_duration", "2ba"),
        algorithms=algorithms,
        device="cpu",
        progress_bar=False,
        seed=0,
        **kwargs,
    )


class RecordInput:
    """Forward pre-hook recording the shape (or value) of a module's first input."""

    def __init__(self, module: torch.nn.Module, keep_values: bool = False):
        self.inputs = []
        self.keep_values = keep_values
        module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.inputs.append(args[0].detach().clone() if self.keep_values else tuple(args[0].shape))


def global_norm(grads: dict) -> float:
    """The gradients' norm over all ranks: FSDP2 gradients are shards (DTensors); DDP's are replicas."""
    squares = sum(
        float(g.full_tensor().pow(2).sum()) if hasattr(g, "full_tensor") else float(g.pow(2).sum())
        for g in grads.values()
    )
    return squares**0.5


def clipping_norms(**trainer_kwargs) -> dict:
    """{"raw", "clipped"}: the global norm of one batch's summed gradients, without and with
    Composer's GradientClipping to a norm of 0.05 (a fresh tiny model each time)."""
    from composer.algorithms import GradientClipping

    norms = {}
    for name, algorithms in (("raw", []), ("clipped", [GradientClipping("norm", 0.05)])):
        capture = GradCapture()
        make_trainer(
            tiny_model(), max_duration="1ba", callbacks=[capture], algorithms=algorithms, **trainer_kwargs
        ).fit()
        norms[name] = global_norm(capture.grads[0])
    return norms
