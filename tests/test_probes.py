"""Probes: feature maps, shattered gradients, lesion study, loss landscape; app, callback, refusals.

One tiny real training run (mini net, synthetic data) is shared by the session; probes that
need depth build small CIFAR ResNets at initialisation.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import CONF_DIR, FAST, PYTHON, cli_env, compose_cfg
from skipstudy import config
from skipstudy.errors import ConfigError
from skipstudy.models import cifar_resnet, mini, resnet18
from skipstudy.probe import run_probe
from skipstudy.probes import feature_maps, landscape, lesion, shattering
from skipstudy.probes.callback import build_probe_callback
from skipstudy.probes.checkpoint import load_run, locate
from skipstudy.probes.context import ProbeContext, calibrated_bn, depth_of
from skipstudy.train import train

TRAIN = [*FAST, "model=mini", "dataset.image_size=16", "trainer.enable_progress_bar=false"]


@pytest.fixture
def trained(session_run):
    """A real 3-step training run of the mini net, the session's (conftest.session_run, trained
    with TRAIN): (run_dir, final metrics, config)."""
    return session_run


def probe_cfg(overrides: list[str], tmp_path: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="probe", overrides=[f"paths.log_dir={tmp_path / 'logs'}", "device=cpu", *overrides])
    GlobalHydra.instance().clear()
    return cfg


def context(run_dir: Path, batches=1) -> tuple[ProbeContext, object]:
    run = load_run(run_dir)
    run.datamodule.setup("fit")
    ctx = ProbeContext(net=run.net, datamodule=run.datamodule, run_dir=run.run_dir, step=run.step,
                       model=OmegaConf.to_container(run.cfg.model), batches=batches)
    return ctx, run


# -- loading checkpoints ---------------------------------------------------------------------

def test_load_run_restores_the_trained_weights(trained):
    run_dir, _, _ = trained
    run = load_run(run_dir)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert run.step == state["global_step"] == 3
    for name, tensor in run.net.state_dict().items():
        assert torch.equal(tensor, state["state_dict"][f"net.{name}"]), name
    # A checkpoint file inside the run works too.
    assert locate(run_dir / "checkpoints" / "last.ckpt") == (run_dir, run_dir / "checkpoints" / "last.ckpt")


def test_bad_checkpoints_are_refused_with_a_short_message(trained, tmp_path):
    with pytest.raises(ConfigError, match="no such file or directory"):
        locate(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="is not a run directory"):
        locate(tmp_path)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("{}")
    with pytest.raises(ConfigError, match="saved no checkpoint"):
        locate(tmp_path)
    stray = tmp_path / "elsewhere" / "model.ckpt"
    stray.parent.mkdir()
    stray.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="no run config"):
        locate(stray)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable PyTorch checkpoint"):
        load_run(tmp_path)


# -- feature maps ----------------------------------------------------------------------------

@pytest.mark.parametrize("build, expected", [
    (lambda: mini(10), ["block1", "block2"]),
    (lambda: cifar_resnet(10, depth=8), ["stem", "layer1", "layer2", "layer3"]),
    (lambda: resnet18(10, skip=False), ["stem", "layer1", "layer2", "layer3", "layer4"]),
])
def test_feature_map_figure_has_one_panel_per_stage(build, expected):
    net = build()
    assert [label for label, _ in feature_maps.stages(net)] == expected
    images = torch.randn(3, 3, 32, 32)
    maps = feature_maps.channel_mean_maps(net, images)
    assert list(maps) == expected
    assert all(m.shape[0] == 3 and m.dim() == 3 for m in maps.values())
    fig = feature_maps.plot(feature_maps.display_images(images, (0, 0, 0), (1, 1, 1)), maps)
    assert len(fig.axes) == 3 * (1 + len(expected))
    assert [ax.get_title().split("\n")[0] for ax in fig.axes[: 1 + len(expected)]] == ["input", *expected]


def test_feature_maps_equal_the_stage_outputs():
    net = cifar_resnet(10, depth=8).eval()
    x = torch.randn(2, 3, 16, 16)
    maps = feature_maps.channel_mean_maps(net, x)
    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        torch.testing.assert_close(maps["stem"], h.mean(1))
        for name in ("layer1", "layer2", "layer3"):
            h = getattr(net, name)(h)
            torch.testing.assert_close(maps[name], h.mean(1))


def test_feature_maps_from_a_checkpoint_write_png_arrays_and_tensorboard(trained, tmp_path):
    run_dir, _, _ = trained
    result = run_probe(probe_cfg(["probe=feature_maps", f"ckpt={run_dir}", "probe.images=2"], tmp_path),
                       tmp_path / "unused")
    out = run_dir / "probes" / "feature_maps"
    assert (out / "feature_maps_step3.png").stat().st_size > 1000
    arrays = np.load(out / "feature_maps_step3.npz")
    assert sorted(arrays.files) == ["block1", "block2", "input"]
    assert arrays["block1"].shape == (2, 16, 16) and arrays["block2"].shape == (2, 8, 8)
    assert set(result) == {"spatial_contrast/block1", "spatial_contrast/block2"}
    from tbparse import SummaryReader

    scalars = SummaryReader(str(run_dir)).scalars
    rows = scalars[scalars.tag == "probe/feature_maps/spatial_contrast/block2"]
    assert list(rows.step) == [3]  # the checkpoint's global step
    # The figure in TensorBoard is the PNG's picture, pixel for pixel.
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event,) = EventAccumulator(str(run_dir), size_guidance={"images": 0}).Reload().Images("probe/feature_maps")
    shown = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    assert event.step == 3
    np.testing.assert_array_equal(shown, np.asarray(Image.open(out / "feature_maps_step3.png").convert("RGB")))


# -- shattered gradients -------------------------------------------------------------------

def test_autocorrelation_is_one_at_lag_zero_and_matches_a_direct_sum():
    g = torch.randn(40, 7, dtype=torch.float64).cumsum(0)
    acf = shattering.autocorrelation(g)
    assert acf[0] == 1.0
    c = g - g.mean(0)
    direct = torch.stack([(c[: 40 - k] * c[k:]).sum() for k in range(40)]) / (c * c).sum()
    torch.testing.assert_close(acf, direct)
    assert shattering.correlation_length(np.array([1.0, 0.6, 0.2])) == pytest.approx(1 + (0.6 - np.exp(-1)) / 0.4)
    assert shattering.correlation_length(np.ones(5)) == 5.0


def test_input_gradients_are_each_points_own_gradient():
    net = cifar_resnet(10, depth=8).eval()
    inputs = shattering.line_inputs(torch.randn(3, 8, 8), torch.randn(3, 8, 8), 6)
    grads = shattering.input_gradients(net, inputs, logit=2, chunk=4)
    for i in (0, 5):
        x = inputs[i : i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(net(x)[0, 2], x)
        torch.testing.assert_close(grads[i], g.flatten().double(), rtol=1e-5, atol=1e-7)


def test_plain_net_without_bn_shatters_faster_than_with_skips():
    """Balduzzi et al. 2017: at depth 20 (no BN) the plain net's gradients decorrelate along the
    line much sooner than the residual net's."""
    x0, x1 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    inputs = shattering.line_inputs(x0, x1, 64)
    acfs = {}
    for skip in (True, False):
        torch.manual_seed(0)
        net = cifar_resnet(10, depth=20, skip=skip, norm="none").eval()
        acfs[skip] = shattering.autocorrelation(shattering.input_gradients(net, inputs, logit=0))
        assert acfs[skip][0] == 1.0
    plain, residual = shattering.correlation_length(acfs[False]), shattering.correlation_length(acfs[True])
    assert plain < 0.6 * residual
    assert acfs[False][1] < acfs[True][1]
    assert (acfs[False][1:6] < acfs[True][1:6]).all()


def test_bn_calibration_is_undone_afterwards():
    net = cifar_resnet(10, depth=8)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    inputs = torch.randn(8, 3, 8, 8)
    with calibrated_bn(net, inputs, chunk=4):
        assert not net.training
        assert not torch.equal(net.bn1.running_mean, before["bn1.running_mean"])
    assert net.training and net.bn1.momentum == 0.1
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.slow
def test_shattering_sweep_at_init_is_one_command_with_a_comparison(tmp_path):
    """Plain vs skip at several depths: one multirun, no checkpoint, one comparison figure."""
    logs = tmp_path / "logs"
    cmd = [PYTHON, "-m", "skipstudy.probe", "-m", "probe=shattering", "model=cifar_resnet", "model.depth=8,14",
           "model.skip=true,false", "model.norm=none", "dataset.image_size=8", "dataset.num_train=16",
           "dataset.num_val=16", "probe.points=32", "device=cpu", f"paths.log_dir={logs}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (logs / "probe").glob("multirun_*")
    table = json.loads((sweep / "probes" / "shattering" / "shattering_comparison.json").read_text())
    assert sorted((r["depth"], r["skip"]) for r in table) == [(8, False), (8, True), (14, False), (14, True)]
    assert (sweep / "probes" / "shattering" / "shattering_comparison.png").stat().st_size > 1000
    # Each job is a run directory of its own: its config, events and the per-run figure.
    jobs = [p for p in sweep.iterdir() if (p / ".hydra" / "config.yaml").is_file()]
    assert len(jobs) == 4
    for job in jobs:
        assert list(job.glob("events.out.tfevents.*"))
        assert (job / "probes" / "shattering" / "shattering_step0.png").is_file()

    # The report on the sweep shows the probes' figures, copied beside its index.html.
    from PIL import Image

    from skipstudy.report import build_report

    report = build_report([sweep], tmp_path / "report")
    captions = [caption for _, caption in report.probe_images]
    assert "probes/shattering/shattering_comparison.png" in captions
    assert sum(c.endswith("shattering_step0.png") for c in captions) == 4
    index = (tmp_path / "report" / "index.html").read_text()
    for name, _ in report.probe_images:
        assert f'src="{name}"' in index
        Image.open(tmp_path / "report" / name).verify()


# -- lesion study --------------------------------------------------------------------------

def test_lesion_with_nothing_deleted_equals_the_validation_accuracy(trained, tmp_path):
    run_dir, metrics, _ = trained
    # FAST validates on 1 batch: the probe evaluates the same batch.
    result = run_probe(probe_cfg(["probe=lesion", f"ckpt={run_dir}", "probe.batches=1", "probe.samples=2"],
                                 tmp_path), tmp_path / "unused")
    assert result["acc_intact"] == pytest.approx(metrics["val/acc"], abs=1e-6)
    record = json.loads((run_dir / "probes" / "lesion" / "lesion_step3.json").read_text())
    assert [b["name"] for b in record["blocks"]] == ["block1", "block2"]
    assert all(b["downsampling"] for b in record["blocks"])  # mini's blocks both project
    assert [r["k"] for r in record["deleted_k"]] == [1, 2]
    assert (run_dir / "probes" / "lesion" / "lesion_step3.png").is_file()


def test_deleting_a_branch_leaves_the_shortcut_and_is_undone():
    # zero_residual starts every branch at 0, so deleting branches cannot change the output.
    net = cifar_resnet(10, depth=14, init="zero_residual").eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
        names = [n for n, _ in lesion.residual_blocks(net)]
        assert len(names) == 6
        with lesion.deleted(net, names):
            assert isinstance(net.layer2[0], lesion.DeletedBranch)
            torch.testing.assert_close(net(x), ref)
        assert not any(isinstance(m, lesion.DeletedBranch) for m in net.modules())
        # A trained-like branch: the lesioned output changes, then comes back.
        torch.manual_seed(0)
        net = cifar_resnet(10, depth=14).eval()
        ref = net(x)
        with lesion.deleted(net, ["layer1.1"]):
            assert not torch.allclose(net(x), ref)
        torch.testing.assert_close(net(x), ref, rtol=0, atol=0)
    assert [lesion.is_downsampling(b) for _, b in lesion.residual_blocks(net)] == [False, False, True, False, True, False]


def test_lesion_refuses_a_plain_twin_and_a_missing_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match=r"plain twin \(model.skip=false\)"):
        lesion.check(cifar_resnet(10, depth=8, skip=False))
    with pytest.raises(ConfigError, match="needs a trained network: pass ckpt="):
        run_probe(probe_cfg(["probe=lesion"], tmp_path), tmp_path / "out")
    with pytest.raises(ConfigError, match="no such file or directory"):
        run_probe(probe_cfg(["probe=lesion", f"ckpt={tmp_path / 'missing'}"], tmp_path), tmp_path / "out")


# -- loss landscape ------------------------------------------------------------------------

def test_landscape_centre_equals_the_checkpoints_loss(trained, tmp_path):
    run_dir, _, _ = trained
    result = run_probe(probe_cfg(["probe=landscape", f"ckpt={run_dir}", "probe.batches=2", "probe.grid=3",
                                  "probe.steps=3"], tmp_path), tmp_path / "unused")
    out = run_dir / "probes" / "landscape"
    grid = np.load(out / "landscape_step3_2d.npy")
    assert grid.shape == (3, 3) and np.isfinite(grid).all()
    # The checkpoint's own loss on the same two training batches, computed independently.
    ctx, run = context(run_dir, batches=2)
    net = run.net.eval()
    with torch.no_grad():
        losses = [(F.cross_entropy(net(x), y, reduction="sum"), len(y)) for x, y in ctx.fixed_batches("train")]
    expected = float(sum(l for l, _ in losses) / sum(n for _, n in losses))
    assert grid[1, 1] == pytest.approx(expected, rel=1e-6)
    assert result["center_loss"] == pytest.approx(expected, rel=1e-6)
    arrays = np.load(out / "landscape_step3.npz")
    assert arrays["loss_1d"][1] == pytest.approx(expected, rel=1e-6)
    assert grid.max() > grid[1, 1]  # a trained point sits in a basin of the slice
    for name in ("landscape_step3_1d.png", "landscape_step3_2d.png"):
        assert (out / name).stat().st_size > 1000


def test_directions_are_filter_normalised_and_skip_bn_and_biases():
    net = cifar_resnet(10, depth=8)
    d = landscape.random_direction(net, torch.Generator().manual_seed(0))
    for name, p in net.named_parameters():
        if p.dim() <= 1:
            assert not d[name].any(), name  # BN weights/biases, fc bias
        else:
            torch.testing.assert_close(d[name].flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1))


def test_landscape_refuses_an_even_grid(trained, tmp_path):
    run_dir, _, _ = trained
    with pytest.raises(ConfigError, match=r"probe.grid=4 must be an odd integer"):
        run_probe(probe_cfg(["probe=landscape", f"ckpt={run_dir}", "probe.grid=4"], tmp_path), tmp_path / "unused")


# -- during training -----------------------------------------------------------------------

def test_probe_callback_runs_at_chosen_epochs_without_changing_training(trained, tmp_path):
    _, metrics, _ = trained
    cfg = compose_cfg([*TRAIN, "trainer.max_epochs=1", "probes.names=[feature_maps,landscape,shattering]",
                       "probes.at_epochs=[0,1]", "probes.batches=1", "+probes.options.landscape.grid=3",
                       "+probes.options.landscape.steps=3", "+probes.options.shattering.points=8"], tmp_path)
    run_dir = Path(cfg.hydra.runtime.output_dir)
    with_probes = train(cfg, run_dir)
    GlobalHydra.instance().clear()
    for name, suffix in (("feature_maps", ".png"), ("landscape", "_2d.npy"), ("shattering", ".json")):
        for step in (0, 3):
            assert (run_dir / "probes" / name / f"{name}_step{step}{suffix}").is_file(), (name, step)
    # Probes run under forked RNGs and restore modes and BN statistics: training is unchanged.
    for key in ("train/loss", "val/loss", "val/acc"):
        assert with_probes[key] == pytest.approx(metrics[key], abs=1e-6), key
    record = json.loads((run_dir / "probes" / "shattering" / "shattering_step0.json").read_text())
    assert record["trained"] is False and record["bn"] == "calibrate" and record["model"]["skip"] is True


def test_probe_callback_refuses_bad_settings_before_training(tmp_path):
    net = mini(10, skip=False)
    probes = OmegaConf.create({"names": ["lesion"], "at_epochs": [1], "batches": None, "options": {}})
    with pytest.raises(ConfigError, match="plain twin"):
        build_probe_callback(probes, net)
    probes.names = ["lesions"]
    with pytest.raises(ConfigError, match=r"probes.names='lesions' is not a probe; valid: feature_maps"):
        build_probe_callback(probes, net)
    probes.names = ["landscape"]
    probes.options = {"landscape": {"gird": 5}}  # config.check, which train() runs first, refuses it
    with pytest.raises(ConfigError, match="probes.options.landscape.gird is not a key of probe landscape; did you mean probes.options.landscape.grid"):
        config.check(compose_cfg(["probes.names=[landscape]", "probes.at_epochs=[1]", "+probes.options.landscape.gird=5"],
                                 tmp_path))
    probes.options = {}
    probes.at_epochs = []
    with pytest.raises(ConfigError, match="needs probes.at_epochs"):
        build_probe_callback(probes, net)
    assert build_probe_callback(OmegaConf.create({"names": [], "at_epochs": []}), net) is None


# -- command line --------------------------------------------------------------------------

def test_cli_prints_one_line_errors_and_writes_into_the_run(trained, tmp_path, monkeypatch, capsys):
    run_dir, _, _ = trained
    # The entry point in-process (a subprocess costs seconds of imports): exit 2, one line.
    from skipstudy.probe import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr("sys.argv", ["probe", "probe=lesion", f"ckpt={tmp_path / 'nope'}", "device=cpu"])
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as exit_info:
        main()
    GlobalHydra.instance().clear()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ckpt=") and "no such file or directory" in err and len(err.splitlines()) == 1
    # Run directories are named after their overrides; '=' and ',' in ckpt need no quoting.
    named = tmp_path / "logs" / "default" / "model.depth=8,model.skip=true"
    named.mkdir(parents=True)
    (named / "2026-01-01_00-00-00_000000").symlink_to(run_dir, target_is_directory=True)
    ckpt = named / "2026-01-01_00-00-00_000000"
    ok = subprocess.run([PYTHON, "-m", "skipstudy.probe", "probe=shattering", f"ckpt={ckpt}", "probe.points=16"],
                        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-3000:]
    # Everything lands in the run: outputs, Hydra's log; no .hydra/ (probes/ is not a run of its own).
    assert (run_dir / "probes" / "shattering" / "shattering_step3.json").is_file()
    assert (run_dir / "probes" / "probe.log").is_file()
    assert not (run_dir / "probes" / ".hydra").exists()
    record = json.loads((run_dir / "probes" / "shattering" / "shattering_step3.json").read_text())
    assert record["trained"] is True and record["bn"] == "eval" and record["points"] == 16


def test_depth_counts_main_path_layers():
    assert depth_of(cifar_resnet(10, depth=20)) == depth_of(cifar_resnet(10, depth=20, skip=False)) == 20
    assert depth_of(resnet18(10)) == 18


def test_readme_probe_commands(trained, tmp_path):
    """The README's probe lines compose as written and point where they say."""
    import shlex

    from conftest import REPO

    run_dir, _, _ = trained
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    lines = [ln.strip() for b in blocks for ln in b.splitlines() if "skipstudy.probe" in ln or "probes." in ln]
    lines = [ln for ln in lines if not ln.startswith("#")]
    assert len(lines) == 5, lines
    for line in lines:
        args = shlex.split(line.replace("$RUN", str(run_dir)))[3:]
        if line.startswith("python -m skipstudy.train"):
            cfg = compose_cfg([*TRAIN, *args], tmp_path)
            GlobalHydra.instance().clear()
            assert build_probe_callback(cfg.probes, mini(10)).at_epochs == [0, 5, 10]
        elif args[0] == "-m":  # the sweep: every job composes (the sweep itself runs in the test above)
            sweep = {a.split("=")[0]: a.split("=")[1].split(",") for a in args[1:]}
            (probe,) = sweep["probe"]
            assert probe in ("shattering", "jacobian")
            for depth in sweep["model.depth"]:
                for skip in sweep["model.skip"]:
                    cfg = probe_cfg([f"probe={probe}", "model=cifar_resnet", f"model.depth={depth}",
                                     f"model.skip={skip}"], tmp_path)
                    assert cfg.probe.name == probe and cfg.model.depth == int(depth)
        else:  # composes, and its ckpt resolves to the run (both probes run on it in tests above)
            cfg = probe_cfg(args, tmp_path)
            assert cfg.probe.name in ("feature_maps", "landscape")
            assert locate(cfg.ckpt)[0] == run_dir


def test_ckpt_paths_are_quoted_for_hydra_only_when_they_exist(tmp_path):
    from skipstudy.runs.dirs import quote_path

    run = tmp_path / "model.depth=20,model.skip=false"
    run.mkdir()
    assert quote_path([f"ckpt={run}", "probe=lesion"], "ckpt", existing_only=True) == [f"ckpt='{run}'", "probe=lesion"]
    assert quote_path(["ckpt=a,b", f"ckpt='{run}'"], "ckpt", existing_only=True) == ["ckpt=a,b", f"ckpt='{run}'"]
