"""The monitor group's keys (``conf/monitor/``): defaults, types and ranges, declared here once;
``GradientFlowMonitor`` takes them as checked values (``skipstudy.config.check``)."""

from __future__ import annotations

from typing import Literal

from skipstudy.keys import Options, Text, key

# stop: skip the non-finite update, write train/diverged, end cleanly | warn: log it, go on
NonFinite = Literal["warn", "stop"]


class Monitor(Options):
    # null: every Conv2d and Linear, in forward order. Or names relative to the network and globs
    # over weighted layers, e.g. [conv1, layer1.0.conv1, "layer3.*.conv*", fc].
    layers: Text | list[Text] | None = key(None, eg=["conv1", "fc"])
    schedule: Literal["every", "log"] = "every"  # every: each every_n_steps-th step | log: log-spaced
    every_n_steps: int = key(1, ge=1, eg=10)
    points_per_decade: int = key(10, ge=1)       # schedule=log: steps 0,1,2,3,5,6,7,10,12,15,19,25,...
    # Every n-th epoch: its first step's output-gradient histograms, the spread of its norms, the figures (0: off).
    hist_every_n_epochs: int = key(1, ge=0)
    # Per residual block: grad_split/*, spp/* and the signal-propagation figure, for the blocks that declare
    # their structure (models/contract.py). null: those, others named in a warning | true: refuse them | false: off
    blocks: bool | None = None
    activations: bool = True     # act/mean, act/std, act/zero_frac of each tracked layer's output
    on_nonfinite: NonFinite = "stop"
    export: Literal["json", "csv", "none"] = "json"  # <run>/grad_stats.json | csv (appended) | none
    figure: bool = True          # <run>/figures/gradient_flow_epoch<E>.png and TB image figures/gradient_flow


class Off(Options):
    on_nonfinite: NonFinite = "stop"


# By the _target_ of conf/monitor/<option>.yaml (None: no _target_).
MONITORS: dict[str | None, type[Options]] = {"skipstudy.monitor.GradientFlowMonitor": Monitor, None: Off}
