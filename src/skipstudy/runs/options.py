"""The optimizer and scheduler groups' keys (``conf/optimizer/``, ``conf/scheduler/``): defaults,
types and ranges of the torch classes they build, declared here once; torch's own defaults do
not apply (every key is in the composed config). Checked by ``skipstudy.config.check``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from skipstudy.errors import ConfigError
from skipstudy.keys import Options, key

Rate = Annotated[float, Field(ge=0, lt=1)]


class SGD(Options):
    lr: float = key(0.1, gt=0)
    momentum: Rate = 0.9
    weight_decay: float = key(5e-4, ge=0)
    nesterov: bool = key(False, eg=False)
    # null: fused on a CUDA device (no host wait for the non-finite stop), torch's choice elsewhere
    fused: bool | None = key(None, eg=True)

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> SGD:
        if self.nesterov and not self.momentum > 0:
            raise ConfigError(f"optimizer.nesterov=true needs optimizer.momentum > 0 (got {self.momentum!r}); "
                              "e.g. optimizer.momentum=0.9, or optimizer.nesterov=false")
        return self


class Adam(Options):
    lr: float = key(1e-3, gt=0)
    betas: list[Rate] = key([0.9, 0.999], min_length=2, max_length=2)
    weight_decay: float = key(0.0, ge=0)
    # null: fused on a CUDA device (no host wait for the non-finite stop), torch's choice elsewhere
    fused: bool | None = key(None, eg=True)


# epoch: the scheduler steps at each epoch end | step: at each optimizer step
Interval = Literal["epoch", "step"]


class MultiStep(Options):
    milestones: list[Annotated[int, Field(ge=1)]] = [100, 150]
    gamma: float = key(0.1, gt=0)
    interval: Interval = "epoch"


class Cosine(Options):
    T_max: int = key(..., ge=1, eg=200)
    eta_min: float = key(0.0, ge=0)
    interval: Interval = "epoch"


class Constant(Options):
    """No scheduler: a constant learning rate."""


# By the _target_ of conf/<group>/<option>.yaml (None: no _target_).
OPTIMIZERS: dict[str | None, type[Options]] = {"torch.optim.SGD": SGD, "torch.optim.Adam": Adam}
SCHEDULERS: dict[str | None, type[Options]] = {
    "torch.optim.lr_scheduler.MultiStepLR": MultiStep, "torch.optim.lr_scheduler.CosineAnnealingLR": Cosine,
    None: Constant}
