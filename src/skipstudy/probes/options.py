"""Each probe's options (``conf/probe/<name>.yaml``, ``probes.options.<name>.*`` in training):
defaults, types and ranges, declared here once; checked by ``skipstudy.config`` before any probe
runs. The probes read them as attributes (``options.steps``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from skipstudy.keys import Options, key, rule

# Batches a probe averages over (null: the whole split; not used by feature_maps and shattering).
Batches = Annotated[int, Field(ge=1)] | None
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
Split = Literal["train", "val"]  # train: stored order, no augmentation
# Eval-mode BN: auto: running stats if trained, calibrated on the probe's inputs at init | eval | calibrate
BN = Literal["auto", "eval", "calibrate"]
LossBN = Literal["train", "eval"]  # the training loss: batch (train) or running statistics
Odd = Annotated[int, rule(lambda n: n >= 3 and n % 2 == 1)]
ODD = "an odd integer >= 3 (the centre is the checkpoint)"


class Probe(Options):
    name: str = key(eg="landscape")
    batches: Batches = key(4, eg=4)


class FeatureMaps(Probe):
    batches: Batches = key(None, eg=4)
    images: int = key(4, ge=1)    # fixed validation images (the first ones), one row each


class Landscape(Probe):
    split: Split = "train"
    steps: Odd = key(51, valid=ODD, bad=4)   # points of the 1-D slice
    grid: Odd = key(21, valid=ODD, bad=4)    # points per axis of the 2-D slice
    span: float = key(1.0, gt=0)             # slices cover [-span, span] along each direction
    seed: Seed = 0                           # draws the directions


class Lesion(Probe):
    samples: int = key(10, ge=1)             # random sets of k deleted blocks per k
    max_k: Annotated[int, Field(ge=1)] | None = key(None, eg=3)  # largest k (null: every block)
    seed: Seed = 0


class Shattering(Probe):
    batches: Batches = key(None, eg=4)
    points: int = key(256, ge=4)             # inputs on the line x(t) = (1 - t) x0 + t x1
    pair: Annotated[list[Annotated[int, Field(ge=0)]], rule(lambda p: len(p) == 2 and p[0] != p[1])] = key(
        [0, 1], valid="a list of 2 different values, each an integer >= 0", bad=[1, 1])  # x0, x1 in the val split
    logit: int = key(0, ge=0)                # the class whose logit is differentiated
    chunk: int = key(64, ge=1)               # inputs per forward/backward pass
    bn: BN = "auto"


class Paths(Probe):
    batches: Batches = key(1, eg=4)
    split: Split = "train"
    samples: int = key(10, ge=1)             # random paths per length k
    mass: float = key(0.9, gt=0, le=1)       # the effective range carries this share of the gradient
    bn: BN = "auto"
    seed: Seed = 0


class Jacobian(Probe):
    batches: Batches = key(1, eg=4)
    samples: int = key(2, ge=1)              # images, one Jacobian each (per stage)
    k: int = key(4, ge=1)                    # top singular values per stage (Lanczos on J^T J)
    iters: int = key(30, ge=1)               # most Lanczos restarts
    tol: float = key(1e-4, ge=0)             # converged when every residual is below tol
    probes: int = key(8, ge=1)               # Rademacher vectors of the Hutchinson estimates
    bn: BN = "auto"
    seed: Seed = 0


class GradSNR(Probe):
    splits: int = key(4, ge=2)               # micro-batches per batch
    bn: LossBN = "train"


class Hessian(Probe):
    batches: Batches = key(2, eg=4)
    k: int = key(1, ge=1)
    iters: int = key(30, ge=1)
    tol: float = key(1e-3, ge=0)
    bn: LossBN = "train"
    seed: Seed = 0


# By probe name, in the order the probes are listed.
PROBE_OPTIONS: dict[str, type[Probe]] = {
    "feature_maps": FeatureMaps, "shattering": Shattering, "lesion": Lesion, "landscape": Landscape,
    "paths": Paths, "jacobian": Jacobian, "grad_snr": GradSNR, "hessian": Hessian}
