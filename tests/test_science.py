"""The studies' headline observation, reproduced end to end through the training entry point.

The notebooks saw first-layer output-gradient norms around 1e-21 in ResNet-50 without skips
and without BatchNorm (PyTorch's default init), and healthy norms with skips. Here each
variant trains for one step on synthetic data and the logged `grad_norm/output/conv1` is read
back from the TensorBoard event file, as a user would read it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tbparse import SummaryReader

from conftest import FAST, compose_cfg
from skipstudy.train import train


def first_step_norms(tmp_path: Path, skip: bool, norm: str) -> dict[str, float]:
    cfg = compose_cfg([*FAST, "model=resnet50", f"model.skip={str(skip).lower()}", f"model.norm={norm}",
                    "model.init=default", "optimizer=adam", "dataset.image_size=64", "dataset.batch_size=4",
                    "trainer.limit_train_batches=1", "trainer.limit_val_batches=0",
                    "monitor.layers=[conv1,layer1.0.conv1,layer2.0.conv2,layer3.5.conv3,fc]",
                    "monitor.on_nonfinite=warn", "trainer.enable_progress_bar=false"], tmp_path / f"skip_{skip}")
    run_dir = Path(cfg.hydra.runtime.output_dir)
    train(cfg, run_dir)
    df = SummaryReader(str(run_dir)).scalars
    rows = df[df.tag.str.startswith("grad_norm/output/") & (df.step == 0)]
    return {tag.split("/", 2)[2]: value for tag, value in zip(rows.tag, rows.value)}


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
