"""The README's commands, run as a new user would run them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import FAST, PYTHON, REPO, cli_env

README = (REPO / "README.md").read_text()


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


# Where each README command is exercised. CI (.ci/run) runs the install line, the test
# command and the quickstart verbatim; the rest are run by the tests named here.
EXERCISED = {
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]"': ".ci/run",
    "python -m skipstudy.train experiment=quickstart": ".ci/run",
    "python -m pytest -q": ".ci/run",
    "python -m pytest -q -m slow": ".ci/run",
    "python -m skipstudy.train model=resnet50 model.skip=false": "test_train.py::test_used_by_line_runs_from_another_directory",
    "python -m skipstudy.train model=mini optimizer=adam optimizer.lr=3e-4 scheduler=cosine trainer.max_epochs=5":
        "test_readme.py::test_cookbook_composition_line",
    "python -m skipstudy.train trainer.enable_checkpointing=false trainer.max_epochs=1":
        "test_config.py::test_readme_trainer_argument_line",
    "python -m skipstudy.train -m model.skip=true,false": "test_train.py::test_multirun_makes_one_directory_per_job",
    "tensorboard --logdir logs": "test_readme.py::test_tensorboard_lists_every_run",
    "python -m skipstudy.train 'logger=[tensorboard,csv,mlflow,wandb]'": "test_loggers.py::test_readme_logger_line",
    "python -m skipstudy.report logs/default --out report":
        "test_report.py::test_cli_with_a_diverged_run_and_different_tracked_layers",
    "python -m skipstudy.probe probe=feature_maps ckpt=$RUN": "test_probes.py::test_readme_probe_commands",
    "python -m skipstudy.probe probe=landscape ckpt=$RUN/checkpoints/last.ckpt probe.grid=31 probe.batches=8":
        "test_probes.py::test_readme_probe_commands",
    "python -m skipstudy.probe -m probe=shattering model=cifar_resnet model.depth=20,56,110 model.skip=true,false":
        "test_probes.py::test_readme_probe_commands",
    "python -m skipstudy.probe -m probe=jacobian model=cifar_resnet model.depth=20,56 model.skip=true,false":
        "test_probes.py::test_readme_probe_commands",
    "python -m skipstudy.train 'probes.names=[feature_maps,lesion]' 'probes.at_epochs=[0,5,10]' probes.batches=2":
        "test_probes.py::test_readme_probe_commands",
    "python -m skipstudy.train experiment=mini_plain_vs_res": "test_sweeps.py::test_mini_plain_vs_res_sweeps_skip_on_real_cifar10",
    "python -m skipstudy.train experiment=he2016_depth hydra/launcher=pool": "test_sweeps.py::test_readme_sweep_commands",
    "python -m skipstudy.train -m hydra/launcher=pool hydra.launcher.workers=4 model=cifar_resnet model.depth=20,56 "
    "model.skip=true,false seed=0,1": "test_sweeps.py::test_readme_sweep_commands",
    "python -m skipstudy.train experiment=he2016_depth hydra/launcher=slurm hydra.launcher.partition=gpu":
        "test_sweeps.py::test_readme_sweep_commands",
    "python -m skipstudy.train -m model.skip=true,false trainer=ddp": "test_sweeps.py::test_ddp_inside_a_multirun_runs_each_job_once",
    "python -m skipstudy.train resume=$RUN": "test_reliability.py::test_readme_resume_commands",
    "python -m skipstudy.train resume=$RUN trainer.max_epochs=20": "test_reliability.py::test_readme_resume_commands",
}


def test_every_readme_command_is_exercised():
    ci = (REPO / ".ci" / "run").read_text()
    for command in readme_commands():
        assert command in EXERCISED, f"README command not exercised by any test or CI: {command}"
        where = EXERCISED[command]
        if where == ".ci/run":
            assert command.split(" && ")[-1] in ci, f"{command!r} is not in .ci/run"
        else:
            test_file, test_name = where.split("::")
            assert f"def {test_name}(" in (REPO / "tests" / test_file).read_text(), where


def test_cookbook_composition_line(make_cfg):
    """The cookbook's composition line composes into the optimizer, schedule and epochs it names."""
    line = next(c for c in readme_commands() if c.startswith("python -m skipstudy.train model=mini optimizer=adam"))
    cfg = make_cfg(line.split()[3:])
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.scheduler._target_.endswith("CosineAnnealingLR") and cfg.scheduler.T_max == 5
    # and it trains (shortened): the composed parts fit together.
    from skipstudy.train import train

    cfg = make_cfg([*line.split()[3:], *FAST, "monitor=off"])
    metrics = train(cfg, cfg.hydra.runtime.output_dir)
    assert "val/acc" in metrics


@pytest.mark.slow
def test_tensorboard_lists_every_run(tmp_path):
    """`tensorboard --logdir logs` serves each run directory as its own run."""
    tensorboard = shutil.which("tensorboard", path=str(Path(PYTHON).parent))
    assert tensorboard, "tensorboard is a runtime dependency and must be installed"
    cmd = [PYTHON, "-m", "skipstudy.train", "-m", "model.skip=true,false", *FAST, "monitor=off"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    server = subprocess.Popen([tensorboard, "--logdir", "logs", "--port", "0", "--host", "127.0.0.1"],
                              cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        deadline = time.time() + 120
        while url is None and time.time() < deadline:
            line = server.stdout.readline()
            match = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            url = match.group(1) if match else None
        assert url, "tensorboard did not report its address"
        runs: list[str] = []
        while time.time() < deadline:
            runs = json.loads(urllib.request.urlopen(f"{url}/data/runs", timeout=10).read())
            if len(runs) >= 2:
                break
            time.sleep(1)
        assert len(runs) == 2, runs
        assert any("model.skip=true" in r.lower() for r in runs) and any("model.skip=false" in r.lower() for r in runs)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _library_snippets() -> list[str]:
    section = README.split("### The monitor in your own project", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_monitor_library_snippets_run_as_written(tmp_path, monkeypatch):
    """The README's two monitor snippets, executed verbatim (each under 15 lines of code): a
    torchvision resnet18 in a LightningModule with a CSVLogger, and in a plain loop."""
    import csv

    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    snippets = _library_snippets()
    assert len(snippets) == 2
    for code in snippets:
        assert len([line for line in code.splitlines() if line.strip()]) < 15
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)),
                        batch_size=4)

    exec(snippets[0], {"train_loader": loader, "__name__": "snippet"})
    run = tmp_path / "logs" / "lightning_logs" / "version_0"
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    header = rows[0].keys()
    assert {"grad_split/cos/model.layer3.1", "spp/var/model.layer1.0", "grad_decay/slope",
            "grad_norm/output/model.conv1"} <= set(header)
    assert sum(1 for r in rows if r["grad_split/branch/model.layer4.1"]) == 2  # steps 0 and 1
    assert json.loads((run / "grad_stats.json").read_text())["blocks"][0] == "model.layer1.0"

    exec(snippets[1], {"train_loader": loader, "__name__": "snippet"})
    acc = EventAccumulator(str(tmp_path / "logs" / "plain"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"grad_split/shortcut/layer2.0", "spp/grad_std/layer4.1", "grad_norm/weight/fc"} <= tags
    assert [e.step for e in acc.Scalars("grad_split/ratio/layer1.0")] == [0, 1]
