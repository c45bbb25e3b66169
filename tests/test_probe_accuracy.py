"""The iterative and sampled probes report their own accuracy, checked against explicit float64
references on tiny nets: eigenvalues of an explicit Hessian (``torch.autograd.functional.hessian``
+ ``eigvalsh``), singular values of an explicit Jacobian (``svdvals``), near-degenerate spectra and
a largest-magnitude eigenvalue that is negative included; standard errors against a brute-force
jackknife and the exact variance of Hutchinson's estimator; and the one-line warning when a probe
stops before converging.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from skipstudy.models import mini
from skipstudy.probe import run_probe
from skipstudy.probes import grad_snr, hessian, jacobian, paths, shattering
from skipstudy.probes.context import loss_mode
from skipstudy.probes.spectra import top_eigenpairs
from test_probes import probe_cfg, trained  # noqa: F401 (trained: the session's shared run)


def explicit_hessian(net: nn.Module, batches) -> torch.Tensor:
    names, shapes = [n for n, _ in net.named_parameters()], [p.shape for p in net.parameters()]
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])

    def loss(theta):
        params = dict(zip(names, [c.view(s) for c, s in zip(theta.split([math.prod(s) for s in shapes]), shapes)]))
        return sum(F.cross_entropy(functional_call(net, params, (x,)), y) for x, y in batches) / len(batches)

    return torch.autograd.functional.hessian(loss, flat)


def by_magnitude(values: torch.Tensor, k: int) -> np.ndarray:
    return values[torch.argsort(values.abs(), descending=True)][:k].numpy()


def explicit_residuals(a: torch.Tensor, eig) -> np.ndarray:
    """``|A v - l v| / |l|`` from the explicit matrix and the returned vectors."""
    v = eig.vectors.double()
    return ((v @ a - torch.from_numpy(eig.values)[:, None] * v).norm(dim=1) / torch.from_numpy(eig.values).abs()).numpy()


# -- the eigensolver ------------------------------------------------------------------------------

SPECTRA = {"negative on top": [-18.63, 18.0, 3.8], "near-degenerate": [10.0, 10.0 * (1 - 1e-6), -9.99],
           "repeated": [10.0, 10.0, -9.99], "cluster": [5.0, 5.0 - 1e-9, 5.0 - 2e-9, 4.999]}


@pytest.mark.parametrize("name", SPECTRA)
def test_lanczos_finds_every_largest_magnitude_eigenvalue_with_its_residual(name):
    """One start vector gives Lanczos one copy of a repeated eigenvalue; the deflation check finds
    the others (``repeated`` and ``cluster`` fail without it)."""
    torch.manual_seed(0)
    n = 120
    q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64)).Q
    top = torch.tensor(SPECTRA[name], dtype=torch.float64)
    spectrum = torch.cat([top, torch.linspace(-3, 3, n - len(top), dtype=torch.float64)])
    a = q @ torch.diag(spectrum) @ q.T
    for k in range(1, len(top) + 1):
        eig = top_eigenpairs(lambda v: v @ a, n, k, 1e-8, 300, torch.Generator().manual_seed(0), a)
        np.testing.assert_allclose(eig.values, by_magnitude(spectrum, k), rtol=1e-9, err_msg=f"k={k}")
        np.testing.assert_allclose(eig.residuals, explicit_residuals(a, eig), rtol=1e-6, atol=1e-14)
        assert eig.converged and (eig.residuals < 1e-8).all()


def test_an_unconverged_value_is_flagged_and_its_residual_still_bounds_its_error():
    torch.manual_seed(1)
    n = 400
    q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64)).Q
    spectrum = torch.cat([torch.tensor([-1.0, 0.999, 0.998]), torch.linspace(-0.99, 0.99, n - 3)]).double()
    a = q @ torch.diag(spectrum) @ q.T
    loose = top_eigenpairs(lambda v: v @ a, n, 1, 3e-2, 100, torch.Generator().manual_seed(0), a)
    assert loose.converged and loose.residuals[0] < 3e-2
    # Parlett thm 4.5.1: some eigenvalue lies within |Av - lv| of the Ritz value.
    assert (spectrum - loose.values[0]).abs().min() <= loose.residuals[0] * abs(loose.values[0]) * (1 + 1e-9)
    # Out of restarts: a Ritz value of the last products, flagged, its residual as honest as ever.
    short = top_eigenpairs(lambda v: v @ a, n, 2, 1e-14, 1, torch.Generator().manual_seed(0), a)
    assert not short.converged and np.isfinite(short.values).all() and (short.residuals > 1e-6).all()
    np.testing.assert_allclose(short.residuals, explicit_residuals(a, short), rtol=1e-6)
    for value, res in zip(short.values, short.residuals):
        assert (spectrum - value).abs().min() <= res * abs(value) * (1 + 1e-9)


# -- Hessian ----------------------------------------------------------------------------------------

def tanh_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(3, 4)).double()
    with torch.no_grad():
        net[0].weight.mul_(3)
        net[4].weight.mul_(4)
    return net


def test_hessian_finds_a_negative_largest_magnitude_eigenvalue():
    """Labels the net gets most wrong make the curvature negative along some direction, more
    than it is positive along any: the audit's situation (-18.63 read as 3.80 by power iteration)."""
    net = tanh_net()
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(5, 2, 4, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    with torch.no_grad():
        batches = [(x, net(x).argmin(dim=1)) for x in xs]
    h = explicit_hessian(net, batches)
    spectrum = torch.linalg.eigvalsh(h)
    assert spectrum[0] < 0 and abs(spectrum[0]) > 1.2 * spectrum[-1]  # the reference is what the test says
    eig = hessian.top_hessian_eigenvalues(net, batches, k=1, iters=100, tol=1e-10,
                                          generator=torch.Generator().manual_seed(0))
    assert eig.values[0] == pytest.approx(float(spectrum[0]), rel=1e-9)
    np.testing.assert_allclose(eig.residuals, explicit_residuals(h, eig), rtol=1e-6, atol=1e-14)


def test_hessian_resolves_a_near_degenerate_top_cluster():
    """Softmax regression near zero weights: the Hessian is about (I/c - 11^T/c^2) kron X^T X / N,
    whose top eigenvalue has c - 1 copies, split apart by the small weights."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 4, bias=False)).double()
    with torch.no_grad():
        net[1].weight.mul_(1e-3)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 2, 2, generator=gen, dtype=torch.float64), torch.randint(0, 4, (16,), generator=gen))]
    h = explicit_hessian(net, batches)
    top = by_magnitude(torch.linalg.eigvalsh(h), 4)
    assert (top[0] - top[2]) / top[0] < 1e-2 and top[0] > top[1] > top[2]  # three copies, slightly apart
    with loss_mode(net, "eval"):
        eig = hessian.top_hessian_eigenvalues(net, batches, k=3, iters=200, tol=1e-10,
                                              generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(eig.values, top[:3], rtol=1e-9)
    np.testing.assert_allclose(eig.residuals, explicit_residuals(h, eig), rtol=1e-6, atol=1e-14)
    assert eig.converged


def test_too_few_iterations_warn_in_one_line(trained, tmp_path, caplog):
    run_dir, _, _ = trained
    with caplog.at_level(logging.WARNING):
        result = run_probe(probe_cfg(["probe=hessian", f"ckpt={run_dir}", "probe.batches=1", "probe.iters=1",
                                      "probe.tol=1e-12", "probe.k=3"], tmp_path), tmp_path / "unused")
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert result["converged"] == 0.0 and math.isfinite(result["top_eig"]) and result["top_eig_residual"] > 1e-12
        assert len(warnings) == 1 and "\n" not in warnings[0]
        assert warnings[0].startswith("probe=hessian stopped before converging") and "raise probe.iters (now 1)" in warnings[0]
        caplog.clear()
        result = run_probe(probe_cfg(["probe=jacobian", f"ckpt={run_dir}", "probe.iters=1", "probe.tol=1e-14",
                                      "probe.k=3", "probe.samples=1"], tmp_path), tmp_path / "unused")
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert result["converged"] == 0.0 and len(warnings) == 1 and "\n" not in warnings[0]
        assert warnings[0].startswith("probe=jacobian stopped before converging at stage(s) block1, block2")


# -- Jacobian -----------------------------------------------------------------------------------------

def test_jacobian_resolves_near_degenerate_singular_values_and_residuals():
    torch.manual_seed(0)
    n_in, n_out = 48, 60
    u = torch.linalg.qr(torch.randn(n_out, n_in, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n_in, n_in, dtype=torch.float64)).Q
    s = torch.cat([torch.tensor([2.0, 2.0 - 2e-6, 2.0 - 4e-6]), torch.linspace(1.0, 0.1, n_in - 3)]).double()
    layer = nn.Linear(n_in, n_out, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(s) @ v.T)
    f = nn.Sequential(nn.Flatten(), layer)
    h = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    got = jacobian.stage_spectrum(f, h, k=3, iters=200, tol=1e-12, probes=4, generator=torch.Generator().manual_seed(0))
    sv = torch.linalg.svdvals(torch.autograd.functional.jacobian(f, h).reshape(n_out, n_in))
    np.testing.assert_allclose(got["singular_values"], sv[:3].numpy(), rtol=1e-10)
    assert got["converged"] and max(got["residuals"]) < 1e-10


def test_hutchinson_standard_errors_match_the_estimators_exact_variance():
    """For Rademacher v, var(v^T A v) = 2 sum_{i != j} A_ij^2 (Hutchinson 1989): the jackknife's
    standard error, averaged over many seeds, matches it, and the estimates scatter as it says."""
    torch.manual_seed(1)
    net = mini(10).double().eval()
    h = jacobian.stem_outputs(net, torch.randn(1, 3, 4, 4, dtype=torch.float64))
    f = nn.Sequential(net.block1)
    explicit = torch.autograd.functional.jacobian(f, h)
    jac = explicit.reshape(-1, h.numel())
    rank = min(jac.shape)
    a = jac.T @ jac
    exact_se = math.sqrt(2 * (a.pow(2).sum() - a.diagonal().pow(2).sum()) / 8) / rank
    runs = [jacobian.stage_spectrum(f, h, k=1, iters=50, tol=1e-6, probes=8, generator=torch.Generator().manual_seed(s))
            for s in range(60)]
    reported = np.mean([r["sv_sq_mean_se"] for r in runs])
    scatter = np.std([r["sv_sq_mean"] for r in runs], ddof=1)
    assert reported == pytest.approx(exact_se, rel=0.15)
    assert scatter == pytest.approx(exact_se, rel=0.3)
    assert np.mean([r["sv_sq_mean"] for r in runs]) == pytest.approx(float(a.trace()) / rank, rel=0.1)
    iso = [r["isometry"] for r in runs]
    assert np.mean([r["isometry_se"] for r in runs]) == pytest.approx(np.std(iso, ddof=1), rel=0.4)


# -- sampled probes ------------------------------------------------------------------------------------

def test_grad_snr_standard_error_equals_a_brute_force_jackknife():
    torch.manual_seed(0)
    net = mini(10).double()
    x, y = torch.randn(20, 3, 6, 6, dtype=torch.float64), torch.randint(0, 10, (20,))
    parts = grad_snr.micro_batches([(x[:10], y[:10]), (x[10:], y[10:])], splits=5)
    with loss_mode(net, "train"):
        stats = grad_snr.split_statistics(net, parts)
        per_part = [torch.cat([g.flatten() for g in torch.autograd.grad(F.cross_entropy(net(xs), ys),
                                                                        list(net.parameters()))]) for xs, ys in parts]
    g = torch.stack(per_part)

    def snr(rows: torch.Tensor) -> float:
        return float(rows.mean(0).pow(2).sum() / rows.var(0, unbiased=True).sum())

    leave_out = np.array([snr(torch.cat([g[:i], g[i + 1 :]])) for i in range(len(g))])
    m = len(g)
    se = math.sqrt((m - 1) / m * ((leave_out - leave_out.mean()) ** 2).sum())
    assert stats["all"]["snr"] == pytest.approx(snr(g), rel=1e-10)
    assert stats["all"]["snr_se"] == pytest.approx(se, rel=1e-8)
    assert all(s["snr_se"] > 0 for s in stats.values())


def test_paths_mean_length_standard_error_is_the_delta_method_of_the_profile():
    rng = np.random.default_rng(0)
    magnitude = np.exp(-0.7 * np.arange(9)) * (1 + 0.1 * rng.random(9))
    by_k = [{"k": k, "mean": m, "se": 0.0 if k in (0, 8) else 0.05 * m * (1 + k / 8)} for k, m in enumerate(magnitude)]
    stats = paths.profile(magnitude, 0.9)
    # Finite differences of the mean length in log m_k, independent of the closed form.
    eps, grad = 1e-6, []
    for k in range(9):
        up = magnitude.copy()
        up[k] *= math.exp(eps)
        grad.append((paths.profile(up, 0.9)["mean_length"] - stats["mean_length"]) / eps)
    expected = math.sqrt(sum((d * r["se"] / r["mean"]) ** 2 for d, r in zip(grad, by_k)))
    assert paths.mean_length_se(stats, by_k) == pytest.approx(expected, rel=1e-4)


def test_shattering_resolution_error_covers_a_finer_lines_length():
    """The correlation length at 65 points, within its reported error of the one at 1025 points."""
    torch.manual_seed(0)
    net = mini(10, norm="none").double().eval()
    x0, x1 = torch.randn(3, 8, 8, dtype=torch.float64), torch.randn(3, 8, 8, dtype=torch.float64)
    frac = {}
    for points in (65, 1025):
        grads = shattering.input_gradients(net, shattering.line_inputs(x0, x1, points), logit=0)
        length = shattering.correlation_length(shattering.autocorrelation(grads))
        frac[points] = (length / (points - 1), shattering.resolution_error(grads, length) / (points - 1))
    assert frac[65][1] > frac[1025][1] > 0
    assert abs(frac[65][0] - frac[1025][0]) <= frac[65][1]


@pytest.mark.slow
def test_probe_accuracy_script_reports_every_probe_converged(shared_data, tmp_path):
    """The script behind docs/benchmarks.md's "Probe accuracy" table, on ResNet-8 and small batches."""
    import subprocess

    from conftest import PYTHON, REPO, cli_env

    cmd = [PYTHON, str(REPO / "scripts" / "probe_accuracy.py"), "--depth", "8", "--power", "--no-write",
           "--data", str(shared_data / "cifar10-mini"), "dataset.batch_size=32"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split(" | ")[1]: line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| ResNet-8")}
    assert set(rows) == {"hessian", "hessian, former default (power, 20 steps)", "jacobian", "grad_snr", "paths",
                         "shattering"}
    for name in ("hessian", "jacobian"):
        accuracy = float(rows[name][3].split()[-1])
        assert rows[name][4] == "yes" and 0 <= accuracy < 1e-3 and int(rows[name][5]) > 1
    for name in ("grad_snr", "paths", "shattering"):  # an error smaller than the value; paths: 0, all 2^3 taken
        assert 0 <= float(rows[name][3].split()[-1]) < abs(float(rows[name][2])), rows[name]
    assert "probe=" not in proc.stderr  # no probe warned (logging's last resort prints to stderr)
