"""Runs shorter than an epoch, runs without validation, and the data loaders' default workers:
what a researcher's first few-step try meets."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from torch.utils.data import DataLoader

from conftest import FAST
from skipstudy.analysis.logs import load_run
from skipstudy.data.arrays import MAX_WORKERS, default_workers
from skipstudy.train import train

SHORT = [*FAST, "model=mini", "dataset.image_size=16", "trainer.enable_progress_bar=false"]


def _train_recording_warnings(cfg) -> tuple[dict, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = train(cfg, cfg.hydra.runtime.output_dir)
    return metrics, [str(w.message) for w in caught]


def test_a_run_stopped_by_max_steps_inside_an_epoch_validates_once_at_its_last_step(make_cfg):
    # 3 batches an epoch, stopped after 2 steps: Lightning alone would never validate.
    cfg = make_cfg([*SHORT, "trainer.max_steps=2", "trainer.limit_val_batches=2"])
    metrics, messages = _train_recording_warnings(cfg)
    run = load_run(cfg.hydra.runtime.output_dir)
    assert run.series("val/acc").steps.tolist() == [1]  # once, at the last step (global step 2 - 1)
    assert run.series("train/loss").steps.tolist() == [0, 1]
    assert 0.0 <= metrics["val/acc"] <= 1.0
    assert not [m for m in messages if "could not find the monitored key" in m], messages
    best = list((Path(cfg.hydra.runtime.output_dir) / "checkpoints").glob("best-*.ckpt"))
    assert [p.name for p in best] == ["best-0-2.ckpt"]  # ranked by that validation


def test_a_run_ending_on_an_epoch_boundary_validates_once_not_twice(make_cfg):
    cfg = make_cfg([*SHORT, "trainer.max_steps=3", "trainer.limit_val_batches=1"])
    train(cfg, cfg.hydra.runtime.output_dir)
    assert load_run(cfg.hydra.runtime.output_dir).series("val/acc").steps.tolist() == [2]


def test_validation_off_has_no_checkpoint_warning_and_no_best_checkpoint(make_cfg):
    cfg = make_cfg([*SHORT, "trainer.max_steps=2", "trainer.limit_val_batches=0"])
    _, messages = _train_recording_warnings(cfg)
    assert not [m for m in messages if "could not find the monitored key" in m], messages
    checkpoints = Path(cfg.hydra.runtime.output_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    assert load_run(cfg.hydra.runtime.output_dir).series("val/acc") is None


def test_default_workers_follow_the_cores_this_process_may_use(tmp_path):
    from skipstudy.data.cifar import CIFAR10DataModule

    cores = len(os.sched_getaffinity(0))
    assert default_workers() == max(0, min(MAX_WORKERS, cores - 1))
    dm = CIFAR10DataModule(root=str(tmp_path), download=False)
    assert dm.num_workers == default_workers()
    assert CIFAR10DataModule(root=str(tmp_path), download=False, num_workers=0).num_workers == 0


def test_the_default_workers_start_without_an_oversubscription_warning(shared_data):
    """PyTorch warns when a DataLoader starts more workers than the cores it may use; the
    default never does (real CIFAR-10 from the shared data folder)."""
    from skipstudy.data.cifar import CIFAR10DataModule

    dm = CIFAR10DataModule(root=str(shared_data / "cifar10-mini"), download=False, verify=False, batch_size=8,
                           device="cpu", loader="torch")
    dm.prepare_data()
    dm.setup("fit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = dm.val_dataloader()
        assert isinstance(loader, DataLoader) and loader.num_workers == default_workers()
        next(iter(loader))
    assert not [w for w in caught if "worker processes in total" in str(w.message)]
