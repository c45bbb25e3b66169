"""Shared fixtures: Hydra-composed configs pointed at tmp_path, real data paths, markers, one
tiny training run per session, and the CLI run in this process."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import runpy
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from skipstudy import overrides

# What the entry points register before Hydra composes (the trainer node, the directory resolvers).
overrides.register()

# The tests' tensors are tiny: a second torch thread costs more in synchronisation than it
# gains, several times more while other work keeps the 2 cores busy. Subprocesses likewise.
torch.set_num_threads(1)

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


# Composing conf/train.yaml costs a noticeable fraction of a second; tests compose the same
# override lists again and again, so each list is composed once per session and copied.
_COMPOSED: dict[tuple[str, ...], DictConfig] = {}
_LOG_DIR, _DATA_DIR = "/placeholder-log-dir", "/placeholder-data-dir"


def force_accelerator_path(monkeypatch) -> None:
    """``skipstudy.monitor.sums._fast_path`` forced on for CPU tensors, which a CPU-only machine
    would otherwise never run; there the sums must not read a value on the host (on a GPU it
    would be a device sync): ``cpu_value`` raises."""
    from skipstudy.monitor import sums

    def no_host_read(t):
        raise AssertionError("the accelerator path read a value on the host (cpu_value)")

    monkeypatch.setattr(sums, "_fast_path", lambda t: True)
    monkeypatch.setattr(sums, "cpu_value", no_host_read)


@pytest.fixture(params=["cpu_path", "accelerator_path"])
def sums_path(request, monkeypatch) -> str:
    """Run a monitor test twice: through the sums' CPU paths and through the accelerator path."""
    if request.param == "accelerator_path":
        force_accelerator_path(monkeypatch)
    return request.param


def group_option(group: str, name: str, config_name: str = "train") -> DictConfig:
    """``conf/<group>/<name>.yaml`` as Hydra composes it: its keys and defaults come from the
    option's declared model (e.g. skipstudy/models/options.py), its yaml adds what it sets."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=[f"{group}={name}"])
    GlobalHydra.instance().clear()
    return cfg[group]


def compose_cfg(overrides: list[str], tmp_path: Path) -> DictConfig:
    """Compose conf/train.yaml as `python -m skipstudy.train` would, with paths in tmp_path."""
    key = tuple(overrides)
    if key not in _COMPOSED:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            _COMPOSED[key] = compose(
                config_name="train",
                return_hydra_config=True,
                overrides=[f"paths.log_dir={_LOG_DIR}", f"paths.data_dir={_DATA_DIR}", *overrides],
            )
    cfg = copy.deepcopy(_COMPOSED[key])
    # What composing with this tmp_path would have given: the paths (unless an override set
    # them) and the override list Hydra records.
    paths = {_LOG_DIR: str(tmp_path / "logs"), _DATA_DIR: str(tmp_path / "data")}
    with read_write(cfg), open_dict(cfg):
        for name in ("log_dir", "data_dir"):
            if cfg.paths[name] in paths:
                cfg.paths[name] = paths[cfg.paths[name]]
        task = list(cfg.hydra.overrides.task)
        for i, item in enumerate(task[:2]):
            k, _, v = item.partition("=")
            task[i] = f"{k}={paths.get(v, v)}"
        cfg.hydra.overrides.task = task
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
    env.setdefault("OMP_NUM_THREADS", "1")
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

# The tiny run that probe, report and monitor tests read (mini net, synthetic data, 3 steps).
TRAIN = [*FAST, "model=mini", "dataset.image_size=16", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="session")
def session_run(tmp_path_factory):
    """One real training run of TRAIN for the whole session: (run_dir, final metrics, config).
    Its run directory also holds .hydra/config.yaml, as a CLI run's does."""
    from skipstudy.train import train

    tmp = tmp_path_factory.mktemp("trained")
    cfg = compose_cfg(TRAIN, tmp)
    run_dir = Path(cfg.hydra.runtime.output_dir)
    metrics = train(cfg, run_dir)
    job = cfg.copy()
    with open_dict(job):
        del job["hydra"]
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(job, run_dir / ".hydra" / "config.yaml")
    GlobalHydra.instance().clear()
    return run_dir, metrics, cfg


def run_in_process(module: str, args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in this process, answered as subprocess.run would answer it.

    For cases that check a refusal or a config: a subprocess spends seconds on starting Python
    and importing torch and Lightning before it reads its first argument. The environment,
    working directory and argv are the CLI's; warnings are ignored as cli_env() does; an
    exception that escapes is printed as the interpreter would, with exit status 1.
    """
    out, err = io.StringIO(), io.StringIO()
    saved_cwd, saved_argv, saved_env = os.getcwd(), sys.argv[:], dict(os.environ)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    code = 0
    GlobalHydra.instance().clear()
    try:
        os.chdir(cwd)
        os.environ.pop("HYDRA_FULL_ERROR", None)
        os.environ.update(env or {})
        sys.argv = [module, *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as exit_:
                if exit_.code is None or isinstance(exit_.code, int):
                    code = exit_.code or 0
                else:
                    print(exit_.code, file=sys.stderr)
                    code = 1
            except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught error
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        # Hydra configures logging for the job; its handlers must not outlive the case.
        for handler in root.handlers[:]:
            if handler not in saved_handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(saved_level)
        GlobalHydra.instance().clear()
    return subprocess.CompletedProcess([PYTHON, "-m", module, *args], code, out.getvalue(), err.getvalue())
