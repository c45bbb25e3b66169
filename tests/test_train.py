"""The training entry point, as a user drives it: composed configs, real Trainer, real files."""

from __future__ import annotations

import json
from importlib import metadata
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from tbparse import SummaryReader

from conftest import CONF_DIR, FAST, PYTHON, REPO, cli_env
from conftest import run_in_process
from skipstudy.data.synthetic import SyntheticDataModule, make_synthetic_images
from skipstudy.errors import ConfigError
from skipstudy.train import train


def scalars(run_dir: Path):
    df = SummaryReader(str(run_dir)).scalars
    return {tag: group.sort_values("step") for tag, group in df.groupby("tag")}


def group_options() -> list[tuple[str, str]]:
    pairs = []
    for group_dir in sorted(p for p in CONF_DIR.rglob("*") if p.is_dir()):
        group = group_dir.relative_to(CONF_DIR).as_posix()
        if group.startswith("hydra") or group == "experiment":
            continue  # launchers and presets have tests of their own
        pairs += [(group, f.stem) for f in sorted(group_dir.glob("*.yaml"))]
    return pairs


@pytest.mark.parametrize("group,option", group_options())
def test_every_group_option_composes(group, option, tmp_path):
    GlobalHydra.instance().clear()
    # The probe group belongs to the probe app (conf/probe.yaml), every other to train.yaml.
    app = "probe" if group == "probe" else "train"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=app, overrides=[f"{group}={option}", f"paths.log_dir={tmp_path}"])
    GlobalHydra.instance().clear()
    node = cfg
    for part in group.split("/"):
        node = node[part]
    assert node is not None
    if "_target_" in (node or {}):
        # The target must import: a typo in a _target_ is a config bug, not a user error.
        from hydra.utils import get_object

        assert get_object(node._target_) is not None


def test_short_training_writes_tensorboard_and_checkpoints(make_cfg):
    cfg = make_cfg([*FAST, "optimizer=adam", "scheduler=cosine"])
    run_dir = Path(cfg.hydra.runtime.output_dir)
    metrics = train(cfg, run_dir)

    series = scalars(run_dir)
    for tag in ("train/loss", "train/acc", "train/lr", "val/loss", "val/acc"):
        assert tag in series, f"{tag} missing from the event file; tags: {sorted(series)}"
    # One train/loss point per optimizer step, logged at steps 0, 1, 2.
    assert list(series["train/loss"]["step"]) == [0, 1, 2]
    assert series["train/lr"]["value"].iloc[0] == pytest.approx(1e-3)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert 0.0 <= metrics["val/acc"] <= 1.0
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["packages"]["torch"] == metadata.version("torch")
    assert info["resolved"]["trainer.precision"] == "32-true"


def test_logged_train_loss_is_the_cross_entropy_of_the_batch(make_cfg):
    """train/loss at step 0 equals an independent forward pass of the initial network."""
    cfg = make_cfg([*FAST, "trainer.limit_train_batches=1", "monitor=off", "optimizer.lr=1e-9"])
    run_dir = Path(cfg.hydra.runtime.output_dir)
    # Rebuild the same initial network and first batch independently of the Trainer.
    import lightning as L
    from hydra.utils import instantiate

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = instantiate(cfg.dataset, seed=cfg.seed)
    net = instantiate(cfg.model, num_classes=dm.num_classes, in_channels=dm.channels)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    expected = torch.nn.functional.cross_entropy(net(x), y).item()

    train(cfg, run_dir)
    logged = scalars(run_dir)["train/loss"]["value"].iloc[0]
    assert logged == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow  # an epoch of 1024 images
def test_synthetic_data_is_deterministic_and_learnable(make_cfg):
    a, la = make_synthetic_images(64, 10, 3, 16, seed=3)
    b, lb = make_synthetic_images(64, 10, 3, 16, seed=3)
    c, _ = make_synthetic_images(64, 10, 3, 16, seed=4)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    dm = SyntheticDataModule(num_classes=200, image_size=64, num_train=8, num_val=8)
    assert (dm.num_classes, dm.channels, dm.image_size) == (200, 3, 64)
    dm.setup()
    assert dm.train_set.tensors[0].shape == (8, 3, 64, 64)
    assert not torch.equal(dm.train_set.tensors[0], dm.val_set.tensors[0])

    # Learnable: the two-block mini net gets clearly above chance (10%) in one epoch; and hard
    # enough that one epoch does not solve it, so training curves mean something.
    cfg = make_cfg(["trainer.max_epochs=1", "trainer.accelerator=cpu", "optimizer=adam",
                    "monitor=off", "dataset.num_train=1024", "dataset.num_val=256"])
    metrics = train(cfg, cfg.hydra.runtime.output_dir)
    assert 0.3 < metrics["val/acc"] < 0.8


def test_num_classes_and_channels_flow_from_the_dataset(make_cfg):
    cfg = make_cfg([*FAST, "dataset.num_classes=7", "dataset.channels=1", "dataset.image_size=16", "monitor=off"])
    from skipstudy.runs.build import build_datamodule, build_network

    dm = build_datamodule(cfg)
    net = build_network(cfg, dm)
    out = net(torch.zeros(2, 1, 16, 16))
    assert out.shape == (2, 7)


@pytest.mark.parametrize(
    "override,key",
    [("optimizer.lr=0", "optimizer.lr"), ("optimizer.lr=-1", "optimizer.lr"),
     ("dataset.batch_size=0", "dataset.batch_size")],
)
def test_bad_numbers_are_refused_before_training(make_cfg, override, key):
    cfg = make_cfg([*FAST, override])
    with pytest.raises(ConfigError, match=key):
        train(cfg, cfg.hydra.runtime.output_dir)
    assert not (Path(cfg.hydra.runtime.output_dir) / "checkpoints").exists()


@pytest.mark.slow
def test_used_by_line_runs_from_another_directory(tmp_path):
    """The README's used-by line, verbatim plus size limits, from a directory outside the repo."""
    cmd = [PYTHON, "-m", "skipstudy.train", "model=resnet50", "model.skip=false",
           *FAST, "trainer.limit_train_batches=2", "dataset.batch_size=4", "monitor=off"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [p.parent for p in (tmp_path / "logs").rglob("events.out.tfevents.*")]
    assert len(runs) == 1
    # The run directory is named by its overrides, so `ls` and TensorBoard tell runs apart.
    assert "model=resnet50" in runs[0].parent.name and "model.skip=false" in runs[0].parent.name
    assert (runs[0] / ".hydra" / "config.yaml").is_file()
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file()
    assert "train/loss" in scalars(runs[0])


@pytest.mark.slow
def test_multirun_makes_one_directory_per_job(tmp_path):
    cmd = [PYTHON, "-m", "skipstudy.train", "-m", "model.skip=true,false", *FAST, "monitor=off"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent.name for p in (tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert len(runs) == 2
    assert "model.skip=false" in runs[0].lower() and "model.skip=true" in runs[1].lower()


def test_unknown_model_lists_choices(tmp_path):
    proc = run_in_process("skipstudy.train", ["model=resnet51"], tmp_path)
    assert proc.returncode != 0
    assert "resnet51" in proc.stderr and "resnet50" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").rglob("events.out.*"))


def test_repository_layout():
    for path in ("pyproject.toml", "conf", "src/skipstudy", "scripts", "tests", "logs/.gitkeep", "README.md"):
        assert (REPO / path).exists(), path


def test_sweep_subdir_is_led_by_the_naming_keys_a_job_sets():
    from skipstudy.runs.dirs import sweep_subdir

    assert sweep_subdir("model.skip=true", ["model.skip=true"]) == "model.skip=true"
    assert sweep_subdir("model.skip=true", ["name=b", "model.skip=true", "experiment=quickstart"]) == \
        "experiment=quickstart,name=b,model.skip=true"
    assert sweep_subdir("", ["name=a"]) == "name=a"
    assert sweep_subdir("", []) == "defaults"


@pytest.mark.slow
def test_pool_jobs_that_differ_only_in_name_get_their_own_directories(tmp_path):
    """`name` stays out of override_dirname, yet two sweep jobs never share a directory."""
    cmd = [PYTHON, "-m", "skipstudy.train", "-m", "hydra/launcher=pool", "hydra.launcher.workers=2",
           "name=a,b", *FAST, "monitor=off", "trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent for p in (tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert len(runs) == 2 and runs[0] != runs[1]
    assert runs[0].name.startswith("name=a,") and runs[1].name.startswith("name=b,")
    # Each job's own Hydra record is intact (nothing written over by the other job).
    assert [(r / ".hydra" / "overrides.yaml").read_text().count("name=") for r in runs] == [1, 1]
    assert "name=a" in (runs[0] / ".hydra" / "overrides.yaml").read_text()
