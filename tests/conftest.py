"""Shared fixtures: Hydra-composed configs pointed at tmp_path, real data paths, markers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict, read_write

import skipstudy.config  # noqa: F401 - registers the trainer node the configs start from

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
# Small real subsets of CIFAR-10 and Tiny ImageNet live beside the repository (never in it).
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data subsets not found at {SHARED_DATA}")
    return SHARED_DATA


def compose_cfg(overrides: list[str], tmp_path: Path) -> DictConfig:
    """Compose conf/train.yaml as `python -m skipstudy.train` would, with paths in tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train",
            return_hydra_config=True,
            overrides=[f"paths.log_dir={tmp_path / 'logs'}", f"paths.data_dir={tmp_path / 'data'}", *overrides],
        )
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg([overrides])`` -> a composed config whose run directory is tmp_path/run."""
    yield lambda overrides=(): compose_cfg(list(overrides), tmp_path)
    GlobalHydra.instance().clear()


def cli_env() -> dict[str, str]:
    """Environment for `python -m skipstudy.train` subprocesses: quiet, CPU, no colour."""
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env["PYTHONWARNINGS"] = "ignore"
    env["CUDA_VISIBLE_DEVICES"] = env.get("SKIPSTUDY_TEST_CUDA", "")
    return env


PYTHON = sys.executable

# Overrides that keep a CLI training run to seconds on a 2-core CPU.
FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.accelerator=cpu",
    "dataset.num_train=96",
    "dataset.num_val=32",
    "dataset.batch_size=16",
]
