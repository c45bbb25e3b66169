"""Fast settings (skipstudy/runs/fast.py): auto resolution, explicit values, what a run records,
channels_last and torch.compile against the eager network, and the benchmark script."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tbparse import SummaryReader

from conftest import FAST, PYTHON, REPO, cli_env, compose_cfg
from skipstudy import config
from skipstudy.errors import ConfigError
from skipstudy.models import cifar_resnet
from skipstudy.runs import fast
from skipstudy.runs.module import LitClassifier
from skipstudy.train import train


def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def fake_cuda(monkeypatch, bf16: bool = True):
    """Resolution only looks at availability and bf16 support; nothing runs on the fake GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


# ------------------------------------------------------------------ resolution


def test_auto_on_the_cpu_is_fp32_with_the_oneDNN_layout(make_cfg, monkeypatch):
    no_cuda(monkeypatch)
    monkeypatch.setattr(fast.platform, "machine", lambda: "x86_64")
    speed = fast.resolve(make_cfg())
    assert speed == fast.FastSettings(precision="32-true", cudnn_benchmark=False,
                                      channels_last=torch.backends.mkldnn.is_available(),
                                      compile=False, on_cuda=False)
    # Without oneDNN's NHWC kernels (an ARM CPU) the layout gain is unmeasured: auto stays off.
    monkeypatch.setattr(fast.platform, "machine", lambda: "aarch64")
    assert fast.resolve(make_cfg()).channels_last is False


def test_auto_is_on_for_a_cuda_gpu(make_cfg, monkeypatch):
    fake_cuda(monkeypatch)
    speed = fast.resolve(make_cfg())
    assert (speed.precision, speed.cudnn_benchmark, speed.channels_last, speed.compile) == (
        "bf16-mixed", True, True, False)
    # A GPU without bf16 keeps fp32 (fp16 would need loss scaling: a choice the user makes).
    fake_cuda(monkeypatch, bf16=False)
    assert fast.resolve(make_cfg()).precision == "32-true"


def test_auto_follows_the_accelerator_not_the_machine(make_cfg, monkeypatch):
    """trainer.accelerator=cpu on a GPU machine trains on the CPU: auto must resolve as on the CPU."""
    fake_cuda(monkeypatch)
    speed = fast.resolve(make_cfg(["trainer.accelerator=cpu"]))
    assert (speed.precision, speed.cudnn_benchmark, speed.channels_last) == (
        "32-true", False, fast.channels_last_helps(on_cuda=False))
    # A deterministic run keeps cudnn.benchmark off (its algorithm choice may vary).
    assert fast.resolve(make_cfg(["trainer.deterministic=true"])).cudnn_benchmark is False


def test_explicit_values_are_honoured(make_cfg, monkeypatch):
    no_cuda(monkeypatch)
    speed = fast.resolve(make_cfg(["fast.channels_last=true", "trainer.benchmark=true",
                                   "trainer.precision=bf16-mixed", "monitor=off", "fast.compile=true"]))
    assert (speed.precision, speed.cudnn_benchmark, speed.channels_last, speed.compile) == (
        "bf16-mixed", True, True, True)
    fake_cuda(monkeypatch)
    speed = fast.resolve(make_cfg(["fast.channels_last=false", "trainer.benchmark=false", "trainer.precision=32"]))
    assert (speed.precision, speed.cudnn_benchmark, speed.channels_last) == ("32", False, False)


@pytest.mark.parametrize("override,key", [
    ("fast.channels_last=yes", "fast.channels_last='yes'"),
    ("fast.compile=auto", "fast.compile='auto'"),
    ("trainer.benchmark=fastest", "trainer.benchmark='fastest'"),
])
def test_bad_values_name_the_key_and_the_choices(make_cfg, override, key):
    with pytest.raises(ConfigError, match=key.replace("'", ".")) as err:
        config.check(make_cfg([override]))  # the schema checks them before fast.resolve runs
    assert "true" in str(err.value) and "false" in str(err.value)


def test_effective_batch_size(make_cfg):
    assert fast.effective_batch_size(make_cfg(["dataset.batch_size=32"])) == 32
    cfg = make_cfg(["dataset.batch_size=32", "trainer.accumulate_grad_batches=4", "trainer.devices=2",
                    "trainer.num_nodes=3"])
    assert fast.effective_batch_size(cfg) == 32 * 4 * 2 * 3
    assert fast.effective_batch_size(make_cfg(["trainer.devices=[0,1]", "dataset.batch_size=8"])) == 16
    assert fast.effective_batch_size(make_cfg(["trainer.devices=auto"])) is None


# ------------------------------------------------------------------ what a run records


def test_resolved_settings_are_recorded_in_run_info_and_hparams(make_cfg):
    cfg = make_cfg([*FAST, "fast.channels_last=true", "dataset.batch_size=16",
                    "trainer.accumulate_grad_batches=2", "monitor=off"])
    run_dir = Path(cfg.hydra.runtime.output_dir)
    train(cfg, run_dir)

    resolved = json.loads((run_dir / "run_info.json").read_text())["resolved"]
    expected = {"trainer.precision": "32-true", "trainer.benchmark": False, "fast.channels_last": True,
                "fast.compile": False, "effective_batch_size": 32}
    assert {k: resolved[k] for k in expected} == expected
    assert resolved["float32_matmul_precision"] == torch.get_float32_matmul_precision()

    hp = SummaryReader(str(run_dir)).hparams
    values = dict(zip(hp["tag"], hp["value"]))
    # The HParams carry the resolved values (not "auto"/None) next to the config's keys.
    assert values["trainer.precision"] == "32-true"
    assert values["fast.channels_last"] in (True, 1.0)
    assert values["trainer.benchmark"] in (False, 0.0)
    assert values["effective_batch_size"] == 32
    assert values["dataset.batch_size"] == 16


# ------------------------------------------------------------------ same numbers, other layout


def tiny_resnet():
    torch.manual_seed(0)
    return cifar_resnet(10, depth=8)


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


@pytest.mark.parametrize("training", [False, True])
def test_channels_last_gives_the_same_logits_and_gradients(training):
    net = tiny_resnet()
    eager = LitClassifier(copy.deepcopy(net), 10, sgd)
    last = LitClassifier(copy.deepcopy(net), 10, sgd, channels_last=True)
    assert last.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 16, 16)
    eager.train(training)
    last.train(training)
    a, b = eager(x), last(x)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    if training:
        a.square().mean().backward()
        b.square().mean().backward()
        for (name, p), q in zip(eager.net.named_parameters(), last.net.parameters()):
            torch.testing.assert_close(q.grad.contiguous(), p.grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.fixture
def quick_compile(monkeypatch):
    """torch.compile with the aot_eager backend: Dynamo capture and AOTAutograd, as with the
    default backend, but no C++ code generation (30 s on 2 CPU cores even for a tiny net)."""
    original = torch.compile

    def compile_(*args, **kwargs):
        kwargs.setdefault("backend", "aot_eager")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_)
    yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_network_matches_eager_and_trains_with_the_monitor(tmp_path, quick_compile, monkeypatch):
    # The monitor's hooks are graph breaks, recompiled per shape: it raises Dynamo's default limit.
    monkeypatch.setattr(torch.compiler.config, "recompile_limit", 8)
    net = tiny_resnet()
    compiled = LitClassifier(copy.deepcopy(net), 10, sgd, compile=True)
    eager = LitClassifier(copy.deepcopy(net), 10, sgd)
    # Compiled in place: parameter names (and so checkpoints and monitor layer names) unchanged.
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)

    # The shipped config: the gradient monitor on, the network compiled. The monitor's rows
    # equal those of the same run in eager mode (its hooks are graph breaks, not traced).
    rows = {}
    for compile_ in ("true", "false"):
        cfg = compose_cfg([*FAST, f"fast.compile={compile_}", "trainer.limit_train_batches=2"],
                          tmp_path / f"compile_{compile_}")
        run_dir = Path(cfg.hydra.runtime.output_dir)
        metrics = train(cfg, run_dir)
        assert torch.isfinite(torch.tensor(metrics["train/loss"]))
        assert json.loads((run_dir / "run_info.json").read_text())["resolved"]["fast.compile"] is (compile_ == "true")
        rows[compile_] = json.loads((run_dir / "grad_stats.json").read_text())
    compiled, eager = rows["true"], rows["false"]
    assert torch.compiler.config.recompile_limit == 256
    assert compiled["step"] == eager["step"] and len(compiled["step"]) == 2
    def series(rows, tag):  # null: not recorded that step (block1's input, the image, has no gradient)
        return np.array([np.nan if v is None else v for v in rows["series"][tag]], np.float64)

    assert compiled["series"].keys() == eager["series"].keys()
    for tag in eager["series"]:
        np.testing.assert_allclose(series(compiled, tag), series(eager, tag), rtol=1e-4, atol=1e-12, err_msg=tag)
    assert np.isfinite(series(eager, "grad_split/ratio/block2")).all()
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert not any("_orig_mod" in k for k in state), sorted(state)[:5]


@pytest.mark.parametrize("overrides, fused", [([], None), (["optimizer.fused=true"], True),
                                               (["optimizer=adam", "optimizer.fused=true"], True)])
def test_the_optimizer_is_fused_on_the_cpu_only_when_asked(make_cfg, overrides, fused):
    """optimizer.fused=null leaves torch's choice on the CPU (a CUDA run gets fused: the GPU
    test); true builds torch's fused kernel, and training with it matches torch's own class."""
    import lightning as L
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader, TensorDataset

    cfg = make_cfg([*FAST, *overrides])
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
    torch.manual_seed(0)
    lit = LitClassifier(cifar_resnet(10, depth=8), 10, instantiate(cfg.optimizer))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(lit, DataLoader(data, batch_size=4))
    assert trainer.optimizers[0].defaults["fused"] is fused
    assert all(torch.isfinite(p).all() for p in lit.parameters())


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_gpu_defaults_train_with_the_monitor(make_cfg):
    cfg = make_cfg([*FAST, "trainer.accelerator=gpu"])
    run_dir = Path(cfg.hydra.runtime.output_dir)
    train(cfg, run_dir)
    resolved = json.loads((run_dir / "run_info.json").read_text())["resolved"]
    assert resolved["fast.channels_last"] is True and resolved["trainer.benchmark"] is True
    assert resolved["trainer.precision"] == ("bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true")
    assert (run_dir / "grad_stats.json").is_file()


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_compile_with_the_monitor(make_cfg):
    cfg = make_cfg([*FAST, "trainer.accelerator=gpu", "fast.compile=true"])
    metrics = train(cfg, cfg.hydra.runtime.output_dir)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


# ------------------------------------------------------------------ the benchmark script


def scripts_importable() -> None:
    """The scripts import their docs writer (scripts/benchmarks_doc.py) from their own folder,
    which Python puts on the path when a script is run; loading one here needs it too."""
    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))


def load_benchmark():
    scripts_importable()
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # runs the layout benchmark
def test_layout_benchmark_measures_both_layouts_and_appends_its_entry(tmp_path):
    scripts_importable()
    spec = importlib.util.spec_from_file_location("bench_layout", REPO / "scripts" / "bench_layout.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Data pipeline\n\nentry\n")
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--threads", "1", "--cases", "mini plain net", "--doc", str(doc)]) == 0
    finally:
        torch.set_num_threads(threads)
    text = doc.read_text()
    assert text.index("## Data pipeline") < text.index(bench.SECTION)
    assert "Command: `python scripts/bench_layout.py --threads 1 --cases 'mini plain net' --doc " in text
    (row,) = [line for line in text.splitlines() if line.startswith("| mini plain net |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    contiguous, last, speedup = float(cells[4]), float(cells[5]), float(cells[6].rstrip("x"))
    assert contiguous > 0 and last > 0 and speedup == pytest.approx(contiguous / last, rel=0.02)


def test_benchmark_appends_to_its_own_section(tmp_path):
    bench = load_benchmark()
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n\n## Data pipeline\n\ndata entry\n")
    bench.append(doc, "### run 1\n\ntable 1\n")
    bench.append(doc, "### run 2\n\ntable 2\n")
    text = doc.read_text()
    assert text.index("## Data pipeline") < text.index("data entry") < text.index(bench.SECTION)
    assert text.index(bench.SECTION) < text.index("### run 1") < text.index("### run 2")
    # A section after ours stays after ours, and new entries go before it.
    doc.write_text(text + "\n## Later\n\nlater text\n")
    bench.append(doc, "### run 3\n")
    text = doc.read_text()
    assert text.index("### run 2") < text.index("### run 3") < text.index("## Later") < text.index("later text")


@pytest.mark.slow
def test_benchmark_runs_end_to_end_and_writes_the_table(shared_data, tmp_path):
    doc = tmp_path / "bench.md"
    args = ["--quick", "--steps", "2", "--doc", str(doc)]
    proc = subprocess.run([PYTHON, str(REPO / "scripts" / "benchmark.py"), *args], cwd=tmp_path,
                          env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = doc.read_text()
    assert "## End-to-end throughput" in text
    assert f"Command: `python scripts/benchmark.py {' '.join(args)}`" in text
    assert "torch " in text and "no GPU" in text
    rows = [line for line in text.splitlines() if line.startswith("| cifar-resnet20-32px |")]
    setups = [line.split(" | ")[1] for line in rows]
    assert setups == ["notebook", "skipstudy", "skipstudy, monitor off", "raw loop", "model-only",
                      "skipstudy, contiguous"]
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[8].replace(",", "")) > 0  # images/s
        assert float(cells[12].split()[0].replace(",", "")) > 100  # peak RSS MiB of a torch process
    layouts = dict(zip(setups, [line.split(" | ")[4] for line in rows]))
    default = "channels_last" if fast.channels_last_helps(on_cuda=False) else "contiguous"
    # raw loop and model-only use skipstudy's resolved layout ("identical settings"); the notebook its own.
    assert layouts["skipstudy"] == layouts["raw loop"] == layouts["model-only"] == default
    assert layouts["notebook"] == layouts["skipstudy, contiguous"] == "contiguous"
    # GPU workloads are never estimated on a CPU-only machine.
    for name in ("resnet50-224px-tiny-imagenet", "cifar-resnet56-epoch"):
        gpu_rows = [line for line in text.splitlines() if line.startswith(f"| {name} |")]
        assert gpu_rows and all("not measured (no GPU)" in line for line in gpu_rows)
    assert "GPU: skipstudy / model-only bound >= 0.90 (same workload): **not measured**" in text
