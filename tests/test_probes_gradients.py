"""Probes of gradient signal: path lengths, stage Jacobians, gradient SNR, Hessian eigenvalues.

Every number is checked against an independent float64 computation on a tiny net: an exact
enumeration of paths through explicit block Jacobians, ``torch.autograd.functional.jacobian``
+ ``svdvals``, explicit per-split gradients, an explicit Hessian + ``eigvalsh``.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch import nn
from torch.func import functional_call

from conftest import PYTHON, cli_env, compose_cfg
from skipstudy import config
from skipstudy.errors import ConfigError
from skipstudy.models import cifar_resnet, mini
from skipstudy.probe import run_probe
from skipstudy.probes import grad_snr, hessian, jacobian, paths
from skipstudy.probes.callback import build_probe_callback
from skipstudy.probes.checkpoint import locate
from skipstudy.probes.context import loss_mode
from skipstudy.probes.spectra import trace_moments
from skipstudy.train import train
from test_probes import TRAIN, probe_cfg, trained  # noqa: F401 (trained: this module's shared run)


def tb_scalars(run_dir: Path, prefix: str) -> dict[str, list[int]]:
    from tbparse import SummaryReader

    df = SummaryReader(str(run_dir)).scalars
    df = df[df.tag.str.startswith(prefix)]
    return {tag: sorted(rows.step.tolist()) for tag, rows in df.groupby("tag")}


def probe_record(run_dir: Path, name: str, step: int = 3) -> dict:
    out = run_dir / "probes" / name
    assert (out / f"{name}_step{step}.png").stat().st_size > 1000
    return json.loads((out / f"{name}_step{step}.json").read_text())


# -- checkpoints: a run directory, its checkpoints/ folder or a .ckpt file ---------------------

def test_ckpt_may_be_the_run_its_checkpoints_folder_or_a_file(trained, tmp_path):
    run_dir, _, _ = trained
    last = run_dir / "checkpoints" / "last.ckpt"
    assert locate(run_dir) == locate(run_dir / "checkpoints") == locate(last) == (run_dir, last)
    cfg = probe_cfg(["probe=grad_snr", f"ckpt={run_dir / 'checkpoints'}", "probe.batches=1", "probe.splits=2"], tmp_path)
    assert run_probe(cfg, tmp_path / "unused")["snr_all"] > 0
    # A checkpoints/ folder without last.ckpt names the files it has.
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("{}")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "epoch=0-step=3.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"last.ckpt does not exist; available: epoch=0-step=3.ckpt"):
        locate(tmp_path / "checkpoints")


# -- path lengths ------------------------------------------------------------------------------

def explicit_path_gradients(net, x, y) -> dict[tuple[int, ...], torch.Tensor]:
    """Per path (the blocks whose branch it takes) and image: the gradient at the first block's
    input as a product of explicit block Jacobians ``D (S or B)`` (float64, eval mode)."""
    blocks = [b for _, b in paths.residual_blocks(net)]
    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        inputs = []
        for b in blocks:
            inputs.append(h)
            h = b(h)

    def branch(b):
        return lambda z: b.bn2(b.conv2(torch.relu(b.bn1(b.conv1(z)))))

    out = {}
    for i in range(len(x)):
        tail = h[i : i + 1].clone().requires_grad_(True)
        loss = F.cross_entropy(net.fc(torch.flatten(net.avgpool(tail), 1)), y[i : i + 1], reduction="sum")
        (g,) = torch.autograd.grad(loss, tail)
        jac = []
        for b, z in zip(blocks, inputs):
            zi = z[i : i + 1]
            mask = ((branch(b)(zi) + b.shortcut(zi)) > 0).flatten().double()
            n_out = mask.numel()
            s = torch.autograd.functional.jacobian(b.shortcut, zi).reshape(n_out, -1)
            bj = torch.autograd.functional.jacobian(branch(b), zi).reshape(n_out, -1)
            jac.append((mask[:, None] * s, mask[:, None] * bj))
        for k in range(len(blocks) + 1):
            for chosen in itertools.combinations(range(len(blocks)), k):
                v = g.flatten()
                for j in reversed(range(len(blocks))):
                    v = v @ jac[j][1 if j in chosen else 0]
                out.setdefault(chosen, []).append(v)
    return {key: torch.stack(vs) for key, vs in out.items()}


def test_path_gradients_equal_an_exact_enumeration_with_explicit_jacobians():
    torch.manual_seed(0)
    net = cifar_resnet(10, depth=8).double().eval()  # 3 blocks: 8 paths; two zero-pad shortcuts
    x, y = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.tensor([1, 7])
    explicit = explicit_path_gradients(net, x, y)
    names = [n for n, _ in paths.residual_blocks(net)]
    for chosen, grads in explicit.items():
        probe = paths.path_gradient_norms(net, [(x, y)], [names[i] for i in chosen])
        torch.testing.assert_close(probe, grads.norm(dim=1), rtol=1e-10, atol=1e-14)
    # The 8 paths add up to the full gradient (Veit et al.'s unrolled view is exact).
    full = paths.path_gradient_norms(net, [(x, y)], None)
    torch.testing.assert_close(full, sum(explicit.values()).norm(dim=1), rtol=1e-10, atol=1e-14)
    assert not any(name in vars(b) for _, b in paths.residual_blocks(net) for name in ("downsample",)
                   if b.shortcut is not paths.residual_blocks(net)[0][1].shortcut)
    # Routing is undone: no hooks left, the shortcuts are the modules' own again.
    assert all(not b.conv1._forward_pre_hooks for _, b in paths.residual_blocks(net))
    assert isinstance(net.layer2[0].shortcut, nn.Module) and "downsample" not in vars(net.layer2[0])


def test_path_length_profile_by_hand_and_for_a_thousand_blocks():
    stats = paths.profile(np.array([1.0, 0.5, 0.2, 0.01]), mass=0.9)
    total = np.array([1 * 1.0, 3 * 0.5, 3 * 0.2, 1 * 0.01])
    np.testing.assert_allclose(stats["share"], total / total.sum())
    np.testing.assert_allclose(stats["distribution"], [1 / 8, 3 / 8, 3 / 8, 1 / 8])
    assert (stats["effective_lo"], stats["effective_hi"], stats["peak_length"]) == (0, 2, 1)
    assert paths.effective_range(np.array(stats["share"]), 0.8) == (0, 1)
    assert paths.effective_range(np.array([0.0, 0.0, 1.0, 0.0]), 1.0) == (2, 2)
    # 1000 blocks: C(1000, 500) ~ 1e299, times magnitudes 2^-k, no overflow. Shares are then
    # binomial with p = 1/3 (C(n,k) 0.5^k normalised), so the mean path length is n/3.
    n = 1000
    stats = paths.profile(0.5 ** np.arange(n + 1.0), mass=0.9)
    assert np.isfinite(stats["share"]).all() and sum(stats["share"]) == pytest.approx(1.0)
    assert stats["mean_length"] == pytest.approx(n / 3, rel=1e-9)
    assert stats["effective_lo"] < n / 3 < stats["effective_hi"] < n / 2
    sets = paths.path_sets(5, 2, 10, np.random.default_rng(0))
    assert sorted(sets) == list(itertools.combinations(range(5), 2))  # C(5,2) = 10: enumerated
    assert len(paths.path_sets(5, 2, 4, np.random.default_rng(0))) == 4


def test_paths_probe_writes_json_figure_and_tensorboard_and_refuses_plain_twins(trained, tmp_path):
    run_dir, _, _ = trained
    result = run_probe(probe_cfg(["probe=paths", f"ckpt={run_dir}", "probe.samples=2"], tmp_path), tmp_path / "unused")
    record = probe_record(run_dir, "paths")
    assert record["blocks"] == ["block1", "block2"] and record["bn"] == "eval"
    assert [r["k"] for r in record["magnitude"]] == [0, 1, 2] and all(r["exact"] for r in record["magnitude"])
    assert record["distribution"] == pytest.approx([0.25, 0.5, 0.25])
    assert record["summary"] == pytest.approx(result)
    assert 0 <= result["effective_lo"] <= result["effective_hi"] <= 2 and result["blocks"] == 2
    assert tb_scalars(run_dir, "probe/paths/")["probe/paths/mean_length"] == [3]
    # A fresh plain twin from the app: refused before anything is written.
    with pytest.raises(ConfigError, match=r"probe=paths needs skip connections, .*plain twin \(model.skip=false\)"):
        run_probe(probe_cfg(["probe=paths", "model=mini", "model.skip=false"], tmp_path), tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(ConfigError, match=r"probe.mass=1.5 must be a number in \(0, 1\]; e.g. probe.mass=0.9"):
        config.check_probe("paths", OmegaConf.create({"mass": 1.5}))


# -- stage Jacobians ---------------------------------------------------------------------------

# Tens of seconds each on 2 cores (explicit Jacobians); the smallest scale stays in the default run.
@pytest.mark.parametrize("scale", [pytest.param(1.0, marks=pytest.mark.slow), pytest.param(30.0, marks=pytest.mark.slow),
                                   0.003])
def test_stage_singular_values_equal_an_explicit_svd(scale):
    """At ordinary scale and where the singular values reach ~1e5 and ~1e-6 (no BN, weights scaled)."""
    torch.manual_seed(0)
    net = mini(10, norm="batch" if scale == 1.0 else "none").double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(scale)
    h = jacobian.stem_outputs(net, torch.randn(1, 3, 4, 4, dtype=torch.float64))
    modules = [m for _, m in jacobian.stage_modules(net)]
    for s in range(len(modules)):
        f = nn.Sequential(*modules[: s + 1])
        got = jacobian.stage_spectrum(f, h, k=3, iters=200, tol=1e-12, probes=4, generator=torch.Generator().manual_seed(0))
        explicit = torch.autograd.functional.jacobian(f, h).reshape(got["outputs"], got["inputs"])
        sv = torch.linalg.svdvals(explicit)
        np.testing.assert_allclose(got["singular_values"], sv[:3].numpy(), rtol=1e-6)
    if scale != 1.0:
        assert (sv[0] > 1e4) if scale > 1 else (sv[0] < 1e-4)


def test_hutchinson_moments_are_exact_on_scaled_basis_vectors():
    torch.manual_seed(1)
    net = mini(10).double().eval()
    h = jacobian.stem_outputs(net, torch.randn(1, 3, 3, 3, dtype=torch.float64))
    f = nn.Sequential(net.block1, net.block2)
    matvec, n_in, n_out = jacobian.gram_operator(f, h)
    sv = torch.linalg.svdvals(torch.autograd.functional.jacobian(f, h).reshape(n_out, n_in))
    # E[v v^T] = I holds for sqrt(n) e_i as for Rademacher v: the estimator is then exact.
    quad, sq = trace_moments(matvec, torch.eye(n_in, dtype=torch.float64) * math.sqrt(n_in))
    assert quad.mean() == pytest.approx(float((sv**2).sum()), rel=1e-9)
    assert sq.mean() == pytest.approx(float((sv**4).sum()), rel=1e-9)


def test_hutchinson_estimates_the_mean_squared_singular_value():
    torch.manual_seed(1)
    net = mini(10).double().eval()
    h = jacobian.stem_outputs(net, torch.randn(1, 3, 6, 6, dtype=torch.float64))
    f = nn.Sequential(net.block1)
    got = jacobian.stage_spectrum(f, h, k=1, iters=2, tol=0, probes=400, generator=torch.Generator().manual_seed(0))
    sv = torch.linalg.svdvals(torch.autograd.functional.jacobian(f, h).reshape(got["outputs"], got["inputs"]))
    assert got["sv_sq_mean"] == pytest.approx(float((sv**2).mean()), rel=0.05)
    assert got["isometry"] == pytest.approx(float((sv**4).mean() / (sv**2).mean() ** 2), rel=0.1)


def test_jacobian_probe_writes_every_stage(trained, tmp_path):
    run_dir, _, _ = trained
    result = run_probe(probe_cfg(["probe=jacobian", f"ckpt={run_dir}", "probe.iters=5", "probe.k=2"], tmp_path),
                       tmp_path / "unused")
    record = probe_record(run_dir, "jacobian")
    assert [r["stage"] for r in record["stages"]] == ["block1", "block2"]
    assert record["stages"][0]["inputs"] == 3 * 16 * 16 and record["stages"][1]["outputs"] == 32 * 8 * 8
    assert all(len(r["singular_values"]) == 2 and r["singular_values"][0] >= r["singular_values"][1]
               for r in record["stages"])
    assert result["sigma_max"] == record["stages"][-1]["sigma_max"] > 0
    assert "probe/jacobian/sigma_max/block1" in tb_scalars(run_dir, "probe/jacobian/")
    with pytest.raises(ConfigError, match=r"probe.k=0 must be a positive integer; e.g. probe.k=4"):
        config.check_probe("jacobian", OmegaConf.create({"k": 0}))


@pytest.mark.slow
def test_jacobian_sweep_at_init_is_one_command_with_a_comparison(tmp_path):
    logs = tmp_path / "logs"
    cmd = [PYTHON, "-m", "skipstudy.probe", "-m", "probe=jacobian", "model=cifar_resnet", "model.depth=8,14",
           "model.skip=true,false", "dataset.image_size=8", "dataset.num_train=16", "dataset.num_val=16",
           "probe.samples=1", "probe.iters=4", "probe.k=2", "device=cpu", f"paths.log_dir={logs}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (logs / "probe").glob("multirun_*")
    table = json.loads((sweep / "probes" / "jacobian" / "jacobian_comparison.json").read_text())
    assert sorted((r["depth"], r["skip"]) for r in table) == [(8, False), (8, True), (14, False), (14, True)]
    assert all(r["sigma_max"] > 0 and r["isometry"] >= 1 for r in table)
    assert (sweep / "probes" / "jacobian" / "jacobian_comparison.png").stat().st_size > 1000
    assert not (sweep / "probes" / "shattering").exists()  # only the probes that ran are compared


# -- gradient SNR --------------------------------------------------------------------------------

def test_split_statistics_equal_explicit_per_split_gradients():
    torch.manual_seed(0)
    net = mini(10).double()
    x, y = torch.randn(12, 3, 6, 6, dtype=torch.float64), torch.randint(0, 10, (12,))
    parts = grad_snr.micro_batches([(x[:8], y[:8]), (x[8:], y[8:])], splits=2)  # micro-batches of 4 and 2
    assert [len(p[1]) for p in parts] == [4, 4, 2, 2]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with loss_mode(net, "train"):
        stats = grad_snr.split_statistics(net, parts)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN running statistics restored
    assert net.training
    # Independent: .backward() per split in train mode on a copy, p.grad collected per layer.
    import copy

    ref = copy.deepcopy(net).train()
    layers = {name: list(ref.get_submodule(name).parameters(recurse=False)) for name in stats if name != "all"}
    layers["all"] = list(ref.parameters())
    per_split = {name: [] for name in layers}
    for xs, ys in parts:
        ref.zero_grad()
        F.cross_entropy(ref(xs), ys).backward()
        for name, ps in layers.items():
            per_split[name].append(torch.cat([p.grad.flatten() for p in ps]))
    assert list(stats) == ["block1.conv1", "block1.conv2", "block1.downsample.0", "block2.conv1", "block2.conv2",
                           "block2.downsample.0", "fc", "all"]
    for name, gs in per_split.items():
        g = torch.stack(gs)
        assert stats[name]["mean"] == pytest.approx(float(g.mean(0).norm()), rel=1e-10)
        assert stats[name]["noise"] ** 2 == pytest.approx(float(g.var(0, unbiased=True).sum()), rel=1e-10)
        assert stats[name]["snr"] == pytest.approx(float(g.mean(0).pow(2).sum() / g.var(0).sum()), rel=1e-10)


def test_identical_micro_batches_have_no_noise_and_bad_splits_are_refused():
    torch.manual_seed(0)
    net = mini(10, norm="none").double()
    x, y = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.tensor([3, 4])
    batch = (x.repeat(4, 1, 1, 1), y.repeat(4))  # 4 micro-batches of the same 2 images
    stats = grad_snr.split_statistics(net, grad_snr.micro_batches([batch], 4))
    assert all(s["noise"] == 0.0 and s["snr"] == math.inf and s["mean"] > 0 for s in stats.values())
    with pytest.raises(ConfigError, match=r"probe.splits=16 is more than a batch's 8 images"):
        grad_snr.micro_batches([batch], 16)
    with pytest.raises(ConfigError, match=r"probe.splits=1 must be an integer >= 2"):
        config.check_probe("grad_snr", OmegaConf.create({"splits": 1}))
    with pytest.raises(ConfigError, match=r"probe.bn='calibrate' is not one of: train, eval; e.g. probe.bn=train"):
        config.check_probe("grad_snr", OmegaConf.create({"bn": "calibrate"}))


def test_grad_snr_probe_writes_per_layer_values(trained, tmp_path):
    run_dir, _, _ = trained
    result = run_probe(probe_cfg(["probe=grad_snr", f"ckpt={run_dir}", "probe.batches=2", "probe.splits=4"], tmp_path),
                       tmp_path / "unused")
    record = probe_record(run_dir, "grad_snr")
    assert record["micro_batch"] == 4 and record["micro_batches"] == 8
    assert [r["name"] for r in record["layers"]][0] == "block1.conv1" and record["layers"][-1]["name"] == "fc"
    assert result["snr_all"] == record["all"]["snr"] > 0
    assert set(tb_scalars(run_dir, "probe/grad_snr/snr/")["probe/grad_snr/snr/fc"]) == {3}


# -- Hessian -------------------------------------------------------------------------------------

def tiny_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4)).double()


# Train mode converges slowly (tens of seconds on 2 cores); eval mode stays in the default run.
@pytest.mark.parametrize("bn", [pytest.param("train", marks=pytest.mark.slow), "eval"])
def test_top_hessian_eigenvalues_equal_an_explicit_hessian(bn):
    net = tiny_bn_net()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 2, 4, 4, generator=gen, dtype=torch.float64), torch.randint(0, 4, (5,), generator=gen))
               for _ in range(2)]
    with loss_mode(net, bn):
        eig = hessian.top_hessian_eigenvalues(net, batches, k=2, iters=2000, tol=1e-12,
                                              generator=torch.Generator().manual_seed(0))
        names = [n for n, _ in net.named_parameters()]
        shapes = [p.shape for p in net.parameters()]
        flat = torch.cat([p.detach().flatten() for p in net.parameters()])

        def loss(theta):
            params = dict(zip(names, [c.view(s) for c, s in zip(theta.split([math.prod(s) for s in shapes]), shapes)]))
            return sum(F.cross_entropy(functional_call(net, params, (x,)), y) for x, y in batches) / len(batches)

        explicit = torch.autograd.functional.hessian(loss, flat)
    spectrum = torch.linalg.eigvalsh(explicit)
    top = spectrum[torch.argsort(spectrum.abs(), descending=True)][:2]
    np.testing.assert_allclose(eig.values, top.numpy(), rtol=1e-9)
    assert eig.converged and (eig.residuals < 1e-9).all() and eig.products > 2


def test_hessian_probe_writes_each_value_beside_its_residual(trained, tmp_path, capsys, caplog):
    run_dir, _, _ = trained
    result = run_probe(probe_cfg(["probe=hessian", f"ckpt={run_dir}", "probe.batches=1", "probe.k=2"], tmp_path),
                       tmp_path / "unused")
    record = probe_record(run_dir, "hessian")
    assert len(record["eigenvalues"]) == 2 and abs(record["eigenvalues"][0]) >= abs(record["eigenvalues"][1])
    assert result["top_eig"] == record["eigenvalues"][0] and result["top_eig_residual"] == record["residuals"][0]
    assert result["converged"] == 1.0 and max(record["residuals"]) < 1e-3 and result["products"] > 2
    assert list(record["summary"])[:2] == ["top_eig", "top_eig_residual"]
    assert set(tb_scalars(run_dir, "probe/hessian/")) >= {"probe/hessian/top_eig", "probe/hessian/top_eig_residual"}
    assert f"  top_eig: {result['top_eig']:.4g} (residual {result['top_eig_residual']:.2g})\n" in capsys.readouterr().out
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


# -- during training -----------------------------------------------------------------------------

def test_new_probes_during_training_leave_training_unchanged(trained, tmp_path):
    _, metrics, _ = trained
    cfg = compose_cfg([*TRAIN, "probes.names=[paths,jacobian,grad_snr,hessian]", "probes.at_epochs=[0,1]",
                       "probes.batches=1", "+probes.options.paths.samples=1", "+probes.options.jacobian.iters=2",
                       "+probes.options.jacobian.samples=1", "+probes.options.hessian.iters=2",
                       "+probes.options.grad_snr.splits=2"], tmp_path)
    run_dir = Path(cfg.hydra.runtime.output_dir)
    with_probes = train(cfg, run_dir)
    GlobalHydra.instance().clear()
    for name in ("paths", "jacobian", "grad_snr", "hessian"):
        for step in (0, 3):
            assert (run_dir / "probes" / name / f"{name}_step{step}.json").is_file(), (name, step)
    # Train-mode BN passes (grad_snr, hessian) and BN calibration (paths, jacobian at step 0)
    # restore buffers and modes, under forked RNGs: the training is the one without probes.
    for key in ("train/loss", "val/loss", "val/acc"):
        assert with_probes[key] == pytest.approx(metrics[key], abs=1e-6), key
    assert json.loads((run_dir / "probes" / "jacobian" / "jacobian_step0.json").read_text())["bn"] == "calibrate"
    probes = OmegaConf.create({"names": ["paths"], "at_epochs": [1], "batches": None, "options": {}})
    with pytest.raises(ConfigError, match="probe=paths needs skip connections"):
        build_probe_callback(probes, mini(10, skip=False))


# -- report ----------------------------------------------------------------------------------------

def test_report_tables_the_probes_headline_numbers(trained, tmp_path):
    import csv

    from skipstudy.report import build_report

    run_dir, _, _ = trained
    result = run_probe(probe_cfg(["probe=hessian", f"ckpt={run_dir}", "probe.batches=1", "probe.iters=2"], tmp_path),
                       tmp_path / "unused")
    report = build_report([run_dir], tmp_path / "report")
    rows = list(csv.DictReader((tmp_path / "report" / "probes.csv").open()))
    hess = [r for r in rows if r["probe"] == "hessian" and r["key"] == "top_eig"]
    assert hess and float(hess[-1]["value"]) == pytest.approx(result["top_eig"]) and hess[-1]["step"] == "3"
    assert not any("/" in r["key"] for r in rows)  # per-layer values stay in the JSON
    index = (tmp_path / "report" / "index.html").read_text()
    assert "<h3>hessian</h3>" in index and "<th>top_eig</th>" in index and "probes.csv" in report.files
