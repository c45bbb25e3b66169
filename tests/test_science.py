"""The studies' headline observation, reproduced end to end through the training entry point.

The notebooks saw first-layer output-gradient norms around 1e-21 in ResNet-50 without skips
and without BatchNorm (PyTorch's default init), and healthy norms with skips. Here each
variant trains for one step on synthetic data and the logged `grad_norm/output/conv1` is read
back from the TensorBoard event file, as a user would read it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tbparse import SummaryReader

from conftest import FAST, compose_cfg
from skipstudy.train import train


STUDIED = "[conv1,layer1.0.conv1,layer2.0.conv2,layer3.5.conv3,fc]"


def first_step(tmp_path: Path, skip: bool, norm: str, batch_size: int = 4, layers: str = STUDIED):
    """Train one step; returns the run directory and the step-0 scalars read back with tbparse."""
    cfg = compose_cfg([*FAST, "model=resnet50", f"model.skip={str(skip).lower()}", f"model.norm={norm}",
                    "model.init=default", "optimizer=adam", "dataset.image_size=64",
                    f"dataset.batch_size={batch_size}", "trainer.limit_train_batches=1", "trainer.limit_val_batches=0",
                    f"monitor.layers={layers}", "monitor.hist_every_n_epochs=0", "monitor.figure=false",
                    "monitor.on_nonfinite=warn", "trainer.enable_progress_bar=false"], tmp_path / f"skip_{skip}")
    run_dir = Path(cfg.hydra.runtime.output_dir)
    train(cfg, run_dir)
    df = SummaryReader(str(run_dir)).scalars
    rows = df[(df.step == 0) | df.tag.str.startswith("hparams/")]  # hparams: at the end of fit
    return run_dir, dict(zip(rows.tag, rows.value))


def first_step_norms(tmp_path: Path, skip: bool, norm: str) -> dict[str, float]:
    _, scalars = first_step(tmp_path, skip, norm)
    prefix = "grad_norm/output/"
    return {tag[len(prefix):]: value for tag, value in scalars.items() if tag.startswith(prefix)}


@pytest.mark.slow  # ~10 s on 2 cores: a ResNet-50 at 64 px
def test_plain_resnet50_first_layer_gradient_is_tiny_but_not_zero(tmp_path):
    """The plain no-BN ResNet-50 with PyTorch's default init: conv1's output gradient is
    ~1e-21 of fc's. Its elements (~1e-25) square to below float32's range, so a float32
    norm logged exactly 0 here; the monitor must log the tiny number, in TensorBoard, in the
    export and in the run's summary metric."""
    run_dir, scalars = first_step(tmp_path, skip=False, norm="none", batch_size=2, layers="[conv1,fc]")
    conv1, fc = scalars["grad_norm/output/conv1"], scalars["grad_norm/output/fc"]
    assert conv1 > 0 and fc > 0
    assert 1e-25 < conv1 / fc < 1e-15, conv1 / fc
    export = json.loads((run_dir / "grad_stats.json").read_text())["series"]
    assert export["grad_norm/output/conv1"][0] == pytest.approx(conv1, rel=1e-6)  # TensorBoard rounds to float32
    rms = export["grad_rms/output/conv1"][0]
    assert rms > 0 and scalars["hparams/min_first_layer_grad_rms"] == pytest.approx(rms, rel=1e-6)
    assert export["grad_norm/weight/conv1"][0] > 0 and scalars["grad_norm/total"] > 0


@pytest.mark.slow
def test_plain_resnet50_without_bn_loses_its_gradient_and_skips_keep_it(tmp_path):
    plain = first_step_norms(tmp_path, skip=False, norm="none")
    residual = first_step_norms(tmp_path, skip=True, norm="none")

    # The loss gradient reaches fc in both nets at a similar size ...
    assert 0.1 < plain["fc"] / residual["fc"] < 10
    # ... but 50 plain layers with PyTorch's default init shrink it by many orders of
    # magnitude on its way to conv1 (the notebooks' ~1e-21), while the identity paths
    # carry it back intact.
    assert plain["conv1"] < 1e-12
    assert residual["conv1"] > 1e-6
    assert residual["conv1"] / plain["conv1"] > 1e6
    # The decay is monotone through the studied layers of the plain net.
    order = ["fc", "layer3.5.conv3", "layer2.0.conv2", "layer1.0.conv1", "conv1"]
    values = [plain[name] for name in order]
    assert values == sorted(values, reverse=True)
