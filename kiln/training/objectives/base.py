"""The one interface every training objective implements.

An objective declares the batch fields it reads (`batch_fields`: ``images``, ``tokens``,
``sample_seeds``) and the model outputs it needs (`model_outputs`), maps a batch to the
model's keyword inputs (`model_inputs`) and turns the model's outputs into the loss and a
few logged scalars (`loss`). The training loop calls only these; it never names an
objective. The loader reads captions only when ``"tokens"`` is among the batch fields.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

__all__ = ["Objective"]


class Objective(ABC):
    """Loss of one model family; `group` is the data-parallel process group (None: world).

    `equal_batches`: the caller's word that every rank's batch has as many samples (kiln's
    loop checks each rank's against ``data.batch_size``); a global-batch loss then skips
    its own check, a collective a step (`kiln.training.objectives.distributed`).
    """

    name: ClassVar[str]
    batch_fields: ClassVar[tuple[str, ...]]
    model_outputs: ClassVar[tuple[str, ...]]

    def __init__(self, cfg: Any, group: Any = None, *, equal_batches: bool = False) -> None:
        self.cfg = cfg
        self.group = group
        self.equal_batches = equal_batches

    @property
    def needs_text(self) -> bool:
        """True when batches must carry tokenized captions."""
        return "tokens" in self.batch_fields

    @property
    def needs_sample_seeds(self) -> bool:
        """True when batches must carry per-sample seeds (the loader skips them otherwise)."""
        return "sample_seeds" in self.batch_fields

    def model_inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keyword arguments of the model's forward, from the batch fields (default: same
        names)."""
        return {name: batch[name] for name in self.batch_fields}

    def check_outputs(self, outputs: Mapping[str, torch.Tensor]) -> None:
        """A clear error when the model does not give what this objective reads."""
        missing = [k for k in self.model_outputs if k not in outputs]
        if missing:
            raise ValueError(
                f"objective {self.name!r} needs model outputs {missing}, the model gave "
                f"{sorted(outputs)}: pick a {self.name} flavor (model.flavor)"
            )

    @abstractmethod
    def loss(
        self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(this rank's loss, {metric name: scalar tensor})``.

        The loss is this rank's share of the global-batch loss: the mean over ranks of the
        ranks' losses is the loss logged, and gradients averaged over ranks are its
        gradients.
        """
