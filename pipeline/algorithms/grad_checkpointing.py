"""Gradient checkpointing of both towers' transformer blocks (open_clip / timm do the work)."""

from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from pipeline.algorithms.unwrap import clip_of


class GradCheckpointing(Algorithm):
    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        clip_of(state.model).set_grad_checkpointing(True)
