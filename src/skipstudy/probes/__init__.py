"""Probes: looks inside a network at one point of its training.

One module per probe, each with ``check(net, options)`` (refuses bad input before any work)
and ``run(ctx, options) -> dict[str, float]`` (see :class:`~skipstudy.probes.context.ProbeContext`):

``feature_maps``  channel-mean activation after each stage, next to the input image
``shattering``    autocorrelation of input gradients along a line (Balduzzi et al. 2017)
``lesion``        accuracy with residual branches deleted (Veit et al. 2016)
``landscape``     1-D and 2-D loss slices, filter-normalised directions (Li et al. 2018)
``paths``         gradient carried by paths of each length, effective depth (Veit et al. 2016)
``jacobian``      singular values of each stage's Jacobian (Pennington et al. 2017)
``grad_snr``      gradient signal-to-noise per layer from micro-batch splits
``hessian``       top eigenvalues of the loss Hessian by power iteration

They run from a checkpoint or a fresh network (``python -m skipstudy.probe``) or at chosen
epochs of a training run (:class:`~skipstudy.probes.callback.ProbeCallback`, ``probes.*`` in
``conf/train.yaml``). Options live in ``conf/probe/<name>.yaml``. A probe module that defines
``comparison_figure`` gets one figure per sweep (:mod:`~skipstudy.probes.comparison`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from skipstudy.errors import ConfigError

PROBES = ("feature_maps", "shattering", "lesion", "landscape", "paths", "jacobian", "grad_snr", "hessian")
# Probes that mean nothing on an untrained network when run from the app without a checkpoint.
NEEDS_CHECKPOINT = ("lesion",)


def get_probe(name: object, key: str = "probe") -> ModuleType:
    """The module of probe ``name``; ``key`` is the config key quoted when it is unknown."""
    if name not in PROBES:
        raise ConfigError(f"{key}={name!r} is not a probe; valid: {', '.join(PROBES)}")
    return importlib.import_module(f"skipstudy.probes.{name}")


__all__ = ["PROBES", "NEEDS_CHECKPOINT", "get_probe"]
