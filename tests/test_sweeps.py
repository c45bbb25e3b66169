"""Sweeps: experiment presets, the pool launcher, DDP inside a multirun, submitit, HParams.

The launcher tests are real ``-m`` sweeps in subprocesses. The GPU-queue test drives the pool
launcher with a tiny Hydra app (no torch import, so it takes seconds) and fake GPU ids; the
others run ``skipstudy.train`` itself on the CPU with a few steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra.utils import get_object, instantiate

from conftest import CONF_DIR, FAST, PYTHON, cli_env, compose_cfg
from skipstudy import config
from skipstudy.analysis.logs import load_run
from skipstudy.launchers import final_metrics as fm
from skipstudy.launchers.jobs import (
    failure_reason,
    forwarded_flags,
    job_hydra_overrides,
    program_prefix,
    single_run_command,
)

PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
# Subprocess sweeps get this long before the test calls them hung (a DDP rank waiting forever).
TIMEOUT = 400


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env or cli_env(), capture_output=True, text=True, timeout=TIMEOUT)


def last_scalars(run_dir: Path) -> dict[str, float]:
    return {tag: s.last() for tag, s in load_run(run_dir).scalars.items()}


def sweep_dirs(log_dir: Path, name: str) -> list[Path]:
    return sorted((log_dir / name).glob("multirun_*"))


def job_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


def events(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("events.out.tfevents.*"))


# ---------------------------------------------------------------- presets


def test_the_six_studies_have_presets():
    assert set(PRESETS) >= {
        "resnet50_noBN_skip_cifar10", "resnet50_plain_tinyimagenet", "resnet18_cifar",
        "mini_plain_vs_res", "he2016_depth", "quickstart",
    }


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_its_parts_build(preset, tmp_path):
    """The composed preset builds its network, and its monitor layers exist in that network."""
    cfg = compose_cfg([f"experiment={preset}"], tmp_path)
    assert cfg.name == preset
    config.check(cfg)  # every value the preset sets is within the declared ranges
    for node in (cfg.dataset, cfg.model, cfg.optimizer):
        assert get_object(node._target_) is not None
    net = instantiate(cfg.model, num_classes=10, in_channels=3)
    from skipstudy.models import check_input_size

    check_input_size(net, cfg.dataset.image_size)
    if "_target_" in cfg.monitor:
        instantiate(cfg.monitor).resolve(net)  # a layer name the network lacks raises ConfigError


def test_presets_reproduce_the_studies_settings(tmp_path):
    c = compose_cfg(["experiment=resnet50_noBN_skip_cifar10"], tmp_path)
    assert (c.model._target_, c.model.skip, c.model.norm, c.model.init) == ("skipstudy.models.resnet50", True, "none", "default")
    assert (c.dataset.image_size, c.dataset.batch_size, c.trainer.max_epochs) == (224, 16, 10)
    assert c.optimizer._target_ == "torch.optim.Adam" and c.optimizer.lr == 1e-3
    layers = ["conv1", "layer1.0.conv1", "layer2.0.conv2", "layer3.5.conv3", "fc"]
    assert list(c.monitor.layers) == layers

    c = compose_cfg(["experiment=resnet50_plain_tinyimagenet"], tmp_path)
    assert (c.model.skip, c.model.norm) == (False, "batch")
    assert c.dataset._target_.endswith("TinyImageNetDataModule") and c.dataset.image_size == 224
    assert (c.optimizer._target_, c.optimizer.lr, c.optimizer.momentum, c.dataset.batch_size) == ("torch.optim.SGD", 0.1, 0.9, 16)
    assert list(c.monitor.layers) == layers[:4] + ["layer4.2.conv1", "fc"]

    c = compose_cfg(["experiment=resnet18_cifar"], tmp_path)
    assert (c.model.stem, c.dataset.augment, c.optimizer.lr, c.optimizer.weight_decay) == ("cifar", True, 0.1, 5e-4)
    assert c.scheduler._target_ == "torch.optim.lr_scheduler.MultiStepLR"

    c = compose_cfg(["experiment=mini_plain_vs_res"], tmp_path)
    assert (c.model._target_, c.dataset.batch_size, c.trainer.max_epochs, c.optimizer.lr) == ("skipstudy.models.mini", 128, 10, 1e-3)
    assert c.hydra.mode.name == "MULTIRUN" and dict(c.hydra.sweeper.params) == {"model.skip": "true,false"}

    c = compose_cfg(["experiment=he2016_depth"], tmp_path)
    assert c.hydra.mode.name == "MULTIRUN"
    assert dict(c.hydra.sweeper.params) == {"model.depth": "20,32,44,56,110", "model.skip": "true,false"}
    assert (c.optimizer.lr, c.optimizer.momentum, c.optimizer.weight_decay, c.dataset.batch_size) == (0.1, 0.9, 1e-4, 128)
    assert (list(c.scheduler.milestones), c.scheduler.interval, c.scheduler.gamma) == ([32000, 48000], "step", 0.1)
    assert c.trainer.max_steps == 64000 and c.trainer.max_epochs == -1

    c = compose_cfg(["experiment=quickstart"], tmp_path)
    assert c.dataset._target_.endswith("SyntheticDataModule") and c.trainer.accelerator == "cpu"


# ---------------------------------------------------------------- job commands (unit)


def test_a_job_becomes_the_single_run_a_user_would_type():
    argv = ["/x/skipstudy/train.py", "-m", "--config-dir", "/my/conf", "model.skip=true,false", "hydra/launcher=pool"]
    orig = ["python3", "-m", "skipstudy.train", *argv[1:]]
    assert program_prefix(argv, orig) == [sys.executable, "-m", "skipstudy.train"]
    assert program_prefix(["-c", "a=1"], ["python", "-c", "CODE", "a=1"]) == [sys.executable, "-c", "CODE"]
    assert forwarded_flags(argv) == ["--config-dir", "/my/conf"]
    assert job_hydra_overrides(["hydra/launcher=pool", "hydra.launcher.workers=2", "hydra.mode=MULTIRUN",
                                "hydra.sweep.dir=/s", "hydra.verbose=true", "hydra.job.chdir=false"]) == [
        "hydra.verbose=true", "hydra.job.chdir=false"]
    cmd = single_run_command(["model.skip=true", "seed=1"], ["hydra.launcher.workers=2"], "/s/model.skip=true,seed=1",
                             job_num=3, argv=argv, orig_argv=orig)
    assert cmd == [sys.executable, "-m", "skipstudy.train", "--config-dir", "/my/conf", "model.skip=true", "seed=1",
                   "hydra.mode=RUN", "hydra.run.dir='/s/model.skip=true,seed=1'", "hydra.job.num=3"]


@pytest.mark.parametrize("output,code,reason", [
    ("lots\nError: optimizer.lr=-1 must be a positive number\nmore\n", 2, "Error: optimizer.lr=-1 must be a positive number"),
    ("Traceback (most recent call last):\n  File x\nRuntimeError: boom\n\nSet the environment variable HYDRA_FULL_ERROR=1 "
     "for a complete stack trace.\n", 1, "RuntimeError: boom"),
    ("epoch 0 ...\r step 3\r", -9, "killed by SIGKILL (out of memory?)"),
    ("Diverged: non-finite loss at step 12\n", 3, "Diverged: non-finite loss at step 12"),
])
def test_failure_reason_is_one_line(output, code, reason):
    assert failure_reason(output, code) == reason


# ---------------------------------------------------------------- pool launcher mechanics

TOY_APP = textwrap.dedent('''
    import json, os, sys, time
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(config_path=".", config_name="toy", version_base="1.3")
    def main(cfg):
        out = HydraConfig.get().runtime.output_dir
        start = time.time()
        time.sleep(cfg.sleep)
        record = {"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start, "end": time.time(),
                  "mode": str(HydraConfig.get().mode), "argv": sys.argv}
        with open(os.path.join(out, "record.json"), "w") as f:
            json.dump(record, f)
        if cfg.fail:
            print(f"Error: fail={cfg.fail} was asked for; use fail=false", file=sys.stderr)
            sys.exit(2)
        if cfg.diverge:  # as skipstudy.train reports a run that diverged
            print("Diverged: non-finite loss at step 3", file=sys.stderr)
            sys.exit(3)
        return cfg.sleep

    if __name__ == "__main__":
        main()
''')
TOY_CONF = textwrap.dedent('''
    sleep: 0.1
    fail: false
    diverge: false
    hydra:
      sweep:
        dir: sweep
        subdir: ${hydra.job.override_dirname}
''')


@pytest.fixture
def toy_app(tmp_path):
    (tmp_path / "app.py").write_text(TOY_APP)
    (tmp_path / "toy.yaml").write_text(TOY_CONF)
    return tmp_path


def test_pool_gives_each_job_a_free_gpu_of_its_own(toy_app):
    """5 jobs of different lengths, 3 workers, 2 (fake) GPUs: a job waits for a free GPU, and
    no two jobs ever hold the same GPU at the same time."""
    sleeps = [1.5, 0.2, 0.8, 0.3, 0.1]
    proc = run([PYTHON, "app.py", "-m", "hydra/launcher=pool", "hydra.launcher.workers=3", "hydra.launcher.gpus=[0,1]",
                f"sleep={','.join(map(str, sleeps))}"], toy_app)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(p.read_text()) for p in sorted((toy_app / "sweep").glob("*/record.json"))]
    assert len(records) == 5
    for r in records:
        assert r["cuda"] in ("0", "1")
        assert r["mode"] == "RunMode.RUN"  # each job is a single run of its own
        assert "-m" not in r["argv"]
    for i, a in enumerate(records):
        for b in records[i + 1:]:
            if a["cuda"] == b["cuda"]:
                assert a["end"] <= b["start"] or b["end"] <= a["start"], (a, b)
    status = json.loads((toy_app / "sweep" / "jobs.json").read_text())
    assert [s["status"] for s in status] == ["completed"] * 5
    assert all(s["gpus"] in (["0"], ["1"]) for s in status)
    # The task function's return value came back to the sweep.
    assert sorted(json.loads(p.read_text())["return_value"] for p in (toy_app / "sweep" / ".pool").glob("*.json")) == sorted(sleeps)


@pytest.mark.gpu
def test_pool_finds_the_machines_gpus(toy_app):
    """Without hydra.launcher.gpus/workers: one worker per visible GPU, each job on one of them."""
    import torch

    env = cli_env()
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = run([PYTHON, "app.py", "-m", "hydra/launcher=pool", "sleep=0.3,0.2,0.1"], toy_app, env)
    assert proc.returncode == 0, proc.stderr
    assert f"{min(torch.cuda.device_count(), 3)} at a time" in proc.stdout + proc.stderr
    ids = {str(i) for i in range(torch.cuda.device_count())}
    records = [json.loads(p.read_text()) for p in (toy_app / "sweep").glob("*/record.json")]
    assert len(records) == 3 and all(r["cuda"] in ids for r in records)


def test_gpu_queue_hands_out_whole_sets_under_contention():
    from hydra_plugins.skipstudy_launchers.pool_launcher import GpuQueue

    pool = GpuQueue(["0", "1", "2", "3", "4"], per_job=2)
    holders: dict[str, int] = {}
    lock = threading.Lock()
    seen_max = []

    def job(k: int) -> None:
        with pool.take() as gpus:
            assert len(gpus) == 2
            with lock:
                for g in gpus:
                    assert g not in holders, f"GPU {g} handed out twice"
                    holders[g] = k
                seen_max.append(len(holders))
            time.sleep(0.01 * (k % 3))
            with lock:
                for g in gpus:
                    del holders[g]

    threads = [threading.Thread(target=job, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert max(seen_max) <= 4


def test_pool_runs_n_cpu_jobs_without_a_gpu_and_reports_failures(toy_app):
    env = cli_env()
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = run([PYTHON, "app.py", "-m", "hydra/launcher=pool", "hydra.launcher.workers=2", "fail=false,true", "sleep=0.5"],
               toy_app, env)
    assert proc.returncode == 1
    assert "1 of 2 jobs completed, 1 failed" in proc.stderr
    assert "fail=True: Error: fail=True was asked for; use fail=false" in proc.stderr
    records = [json.loads(p.read_text()) for p in sorted((toy_app / "sweep").glob("*/record.json"))]
    assert [r["cuda"] for r in records] == ["", ""]
    # Two workers: the two jobs overlapped in time.
    a, b = records
    assert a["start"] < b["end"] and b["start"] < a["end"]


def test_pool_counts_a_diverged_run_as_done(toy_app):
    proc = run([PYTHON, "app.py", "-m", "hydra/launcher=pool", "diverge=false,true"], toy_app)
    assert proc.returncode == 0, proc.stderr
    status = json.loads((toy_app / "sweep" / "jobs.json").read_text())
    assert [s["status"] for s in status] == ["completed", "diverged"]
    assert status[1]["reason"] == "Diverged: non-finite loss at step 3"


# ---------------------------------------------------------------- skipstudy.train sweeps


@pytest.mark.slow
def test_pool_sweep_goes_on_past_a_failing_job(tmp_path):
    """2x2 sweep, 2 workers; ResNet-18 (downsamples by 32) on 16 px images is refused inside
    its job, once the network exists (the sweep's up-front check passes every job's settings):
    3 runs complete, the failure is listed with its reason, and the sweep exits non-zero."""
    cmd = [PYTHON, "-m", "skipstudy.train", "-m", "hydra/launcher=pool", "hydra.launcher.workers=2",
           "model=mini,resnet18", "dataset.image_size=16,32", *FAST, "trainer.limit_train_batches=2", "monitor=off",
           "trainer.enable_progress_bar=false", "name=pool", f"paths.log_dir={tmp_path / 'logs'}"]
    proc = run(cmd, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "3 of 4 jobs completed, 1 failed" in proc.stderr
    failed_line = next(line for line in proc.stderr.splitlines() if line.startswith("  #"))
    assert "model=resnet18 dataset.image_size=16: Error: dataset.image_size=16 is too small for resnet18" in failed_line
    (sweep,) = sweep_dirs(tmp_path / "logs", "pool")
    done = job_dirs(sweep)  # the refused job leaves no run directory behind
    assert len(done) == 3 and not any("model=resnet18" in p.name and "dataset.image_size=16" in p.name for p in done)
    for run_dir in done:
        assert len(events(run_dir)) == 1 and (run_dir / "checkpoints" / "last.ckpt").is_file()
    status = json.loads((sweep / "jobs.json").read_text())
    assert sorted(s["status"] for s in status) == ["completed", "completed", "completed", "failed"]
    (bad,) = [s for s in status if s["status"] == "failed"]
    assert "Error: dataset.image_size=16 is too small" in Path(bad["log"]).read_text()


# TorchElastic's variables: torchrun started the ranks before Python did.
TORCHRUN = {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0", "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("strategy, devices, env, own", [
    ("ddp", 2, {}, True),  # Lightning's script launcher re-executes the command line in rank 1
    ("ddp_spawn", 2, {}, True),  # a fresh interpreter too: harmless, one process start
    ("ddp_fork", 2, {}, False),  # the forked rank runs trainer.fit, not the command line
    ("ddp", 1, {}, False),
    ("ddp", 2, TORCHRUN, False),
])
def test_a_multirun_job_gets_its_own_process_when_its_ranks_start_as_fresh_interpreters(
        tmp_path, monkeypatch, strategy, devices, env, own):
    """Real Trainers (built, never fitted): the public ``launcher.is_interactive_compatible``,
    the cluster environment and the device count decide; a single run never moves."""
    import copy

    import lightning as L
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    from skipstudy.launchers.ddp import needs_own_process

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    cfg = compose_cfg([], tmp_path)  # a single run's Hydra config
    assert needs_own_process(trainer) is False
    multirun = copy.deepcopy(cfg)
    with read_write(multirun.hydra):
        multirun.hydra.mode = "MULTIRUN"
    HydraConfig.instance().set_config(multirun)
    try:
        assert needs_own_process(trainer) is own
    finally:
        HydraConfig.instance().set_config(cfg)


@pytest.mark.slow
def test_ddp_inside_a_multirun_runs_each_job_once(tmp_path):
    """Two jobs, each DDP on the CPU with 2 processes (gloo). Rank 1 must not restart the
    sweep: one sweep directory, exactly two run directories, one event file and one training
    (2 steps) in each, and rank 1 ran in its job's directory."""
    cmd = [PYTHON, "-m", "skipstudy.train", "-m", "model.skip=true,false", "trainer=ddp", "trainer.accelerator=cpu",
           "trainer.devices=2", *FAST, "trainer.limit_train_batches=2", "monitor=off", "trainer.enable_progress_bar=false",
           "name=ddp", f"paths.log_dir={tmp_path / 'logs'}"]
    proc = run(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = sweep_dirs(tmp_path / "logs", "ddp")  # a relaunched sweep would make a second one
    runs = job_dirs(sweep)
    assert len(runs) == 2
    assert list((tmp_path / "logs" / "ddp").iterdir()) == [sweep]
    for run_dir in runs:
        (ev,) = events(run_dir)
        from tbparse import SummaryReader

        loss = SummaryReader(str(ev)).scalars.query("tag == 'train/loss'")
        assert sorted(loss["step"]) == [0, 1]  # trained once, two steps
        assert (run_dir / "train_ddp_process_1.log").is_file()  # Lightning's rank 1 of this job
        assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert proc.stderr.count("Initializing distributed: GLOBAL_RANK: 1") == 2


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_two_job_sweep_and_requeues_with_resume(tmp_path):
    cmd = [PYTHON, "-m", "skipstudy.train", "-m", "hydra/launcher=slurm_local", "model.skip=true,false", *FAST,
           "trainer.limit_train_batches=2", "monitor=off", "trainer.enable_progress_bar=false", "name=sub",
           f"paths.log_dir={tmp_path / 'logs'}"]
    proc = run(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = sweep_dirs(tmp_path / "logs", "sub")
    runs = job_dirs(sweep)
    assert [p.name.split("model.skip=")[1].split(",")[0] for p in runs] == ["False", "True"]
    for run_dir in runs:
        assert len(events(run_dir)) == 1 and (run_dir / "checkpoints" / "last.ckpt").is_file()

    # Requeue: submitit calls the launcher's checkpoint() in the preempted job's process and
    # resubmits what it returns. Here, in a fresh process: checkpoint() of job 0, plus
    # trainer.max_epochs=2 to leave it work to do, then the resubmitted job itself.
    pickles = sorted((sweep / ".submitit").glob("*/*_submitted.pkl"))
    assert len(pickles) == 2
    requeue = textwrap.dedent(f"""
        import json
        from submitit.core.utils import DelayedSubmission
        delayed = DelayedSubmission.load({str(pickles[0])!r})
        requeued = delayed.function.checkpoint(*delayed.args, **delayed.kwargs)
        print("OVERRIDES", json.dumps(requeued.args[0]))
        requeued.args = (requeued.args[0] + ["trainer.max_epochs=2"], *requeued.args[1:])
        print("STATUS", requeued.result().status.name)
    """)
    env = cli_env()
    env["SUBMITIT_DEBUG_JOB_ID"] = "requeued"  # submitit's environment for a job run in-process
    proc = run([PYTHON, "-c", requeue], tmp_path, env)
    assert "STATUS COMPLETED" in proc.stdout, proc.stderr[-3000:]
    overrides = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("OVERRIDES"))[9:])
    resumed = Path(overrides[0][len("resume='"):-1])
    assert resumed in runs and overrides[1:] == [f"hydra.sweep.dir='{sweep}'", f"hydra.sweep.subdir='{resumed.name}'"]
    assert job_dirs(sweep) == runs  # same directory, no new one
    from tbparse import SummaryReader

    steps = SummaryReader(str(resumed)).scalars.query("tag == 'train/loss'")["step"]
    assert sorted(steps) == [0, 1, 2, 3]  # epoch 1 continued from the checkpoint at step 2
    info = json.loads((resumed / "run_info.json").read_text())
    assert [r["from_step"] for r in info["resumes"]] == [2]


@pytest.mark.slow
def test_requeue_before_the_first_checkpoint_starts_the_job_again_with_its_overrides(tmp_path):
    """Preempted before its first checkpoint, a job is resubmitted as it was, also one whose task
    overrides are empty (a multirun over launcher settings only)."""
    cmd = [PYTHON, "-m", "skipstudy.train", "-m", "hydra/launcher=slurm_local", *FAST, "trainer.limit_train_batches=1",
           "monitor=off", "trainer.enable_progress_bar=false", "name=bare", f"paths.log_dir={tmp_path / 'logs'}"]
    proc = run(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = sweep_dirs(tmp_path / "logs", "bare")
    (pickle,) = sorted((sweep / ".submitit").glob("*/*_submitted.pkl"))
    for ckpt in sweep.rglob("last.ckpt"):
        ckpt.unlink()  # as if preempted before the first checkpoint
    requeue = textwrap.dedent(f"""
        import json
        from submitit.core.utils import DelayedSubmission
        delayed = DelayedSubmission.load({str(pickle)!r})
        job, (overrides, *rest) = delayed.function, delayed.args
        for given in (overrides, []):
            print("OVERRIDES", json.dumps([given, job.checkpoint(given, *rest, **delayed.kwargs).args[0]]))
    """)
    proc = run([PYTHON, "-c", requeue], tmp_path, cli_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("continues from the start (no checkpoint yet)") == 2
    pairs = [json.loads(line[len("OVERRIDES "):]) for line in proc.stdout.splitlines() if line.startswith("OVERRIDES")]
    assert len(pairs) == 2 and pairs[0][0] and pairs[1] == [[], []]
    assert all(given == requeued for given, requeued in pairs)


@pytest.mark.slow
def test_quickstart_compares_plain_and_residual_and_fills_the_hparams_dashboard(tmp_path):
    """The quickstart is a sweep by itself: plain-56 and ResNet-56, then both side by side."""
    cmd = [PYTHON, "-m", "skipstudy.train", "experiment=quickstart", "trainer.max_epochs=1", "trainer.limit_train_batches=4",
           "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", f"paths.log_dir={tmp_path / 'logs'}"]
    proc = run(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = sweep_dirs(tmp_path / "logs", "quickstart")
    runs = {("skip=True" in d.name): d for d in job_dirs(sweep)}
    assert len(runs) == 2
    ratio = {}
    for skip, run_dir in runs.items():
        cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
        assert (cfg["model"]["depth"], cfg["model"]["skip"], cfg["model"]["norm"]) == (56, skip, "none")
        last = last_scalars(run_dir)
        # The smallest output-gradient RMS of the first tracked layer over the recorded steps.
        stats = json.loads((run_dir / "grad_stats.json").read_text())
        first, final = stats["layers"][0], stats["layers"][-1]
        series = [v for v in stats["series"][f"grad_rms/output/{first}"] if v is not None]
        assert len(series) == 4
        assert last[fm.MIN_FIRST_LAYER_GRAD_RMS] == pytest.approx(min(series), rel=1e-5)
        assert last[fm.DIVERGED] == 0.0
        # The median over the recorded steps of the depth-decay slope, recomputed from the export's RMS.
        rms = np.array([stats["series"][f"grad_rms/output/{n}"] for n in stats["layers"]], dtype=float)
        slopes = [np.polyfit(np.arange(len(stats["layers"])), np.log10(rms[:, k]), 1)[0] for k in range(rms.shape[1])]
        assert last[fm.GRAD_DECAY_SLOPE] == pytest.approx(float(np.median(slopes)), rel=1e-4)
        assert 0.0 <= last["val/acc"] <= 1.0
        ratio[skip] = series[0] / stats["series"][f"grad_rms/output/{final}"][0]
        # The HParams plugin declares the four final metrics and records the overrides column.
        declared, overrides = hparams_declaration(run_dir)
        assert {"val/acc", "val/loss", fm.MIN_FIRST_LAYER_GRAD_RMS, fm.GRAD_DECAY_SLOPE, fm.DIVERGED} <= declared
        assert "trainer.max_epochs=1" in overrides
    # The phenomenon: without shortcuts the gradient reaching conv1 (relative to fc) is
    # more than a million times smaller than with them.
    assert ratio[False] < 1e-6 * ratio[True]
    # The sweep ends with both runs and the commands to look further.
    tail = proc.stdout[proc.stdout.index("Sweep done: 2 runs in "):]
    assert "model.skip=False" in tail and "model.skip=True" in tail
    assert f"tensorboard --logdir {sweep.relative_to(tmp_path)}" in tail
    assert f"python -m skipstudy.report {sweep.relative_to(tmp_path)}" in tail


def hparams_declaration(run_dir: Path) -> tuple[set[str], str]:
    """(metric tags the HParams plugin declares, the run's 'overrides' hparam)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    return {m.name.tag for m in exp.metric_infos}, start.hparams["overrides"].string_value


@pytest.mark.slow
def test_mini_plain_vs_res_sweeps_skip_on_real_cifar10(tmp_path, shared_data):
    """The preset is a sweep by itself (no -m): one run per model.skip value."""
    # The shared mini copy is a real subset: its MD5 sums differ from the official release.
    cmd = [PYTHON, "-m", "skipstudy.train", "experiment=mini_plain_vs_res", f"dataset.root={shared_data / 'cifar10-mini'}",
           "dataset.verify=false",
           "dataset.loader=device", "dataset.batch_size=32", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
           "trainer.limit_val_batches=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
           f"paths.log_dir={tmp_path / 'logs'}"]
    proc = run(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = sweep_dirs(tmp_path / "logs", "mini_plain_vs_res")
    runs = job_dirs(sweep)
    assert len(runs) == 2
    assert sorted("model.skip=true" in p.name.lower() for p in runs) == [False, True]
    for run_dir in runs:
        last = last_scalars(run_dir)
        assert 0.0 <= last["val/acc"] <= 1.0 and np.isfinite(last["val/loss"])
        assert fm.MIN_FIRST_LAYER_GRAD_RMS in last and last[fm.DIVERGED] == 0.0


# ---------------------------------------------------------------- final metrics (unit)


def _run_with(path: Path, **series: list[float]) -> Path:
    """A real event file: each tag's values at steps 0, 1, ..., written step by step in the given
    tag order (the order the monitor writes layers in)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(path)) as writer:
        for step in range(max(len(v) for v in series.values())):
            for tag, values in series.items():
                if step < len(values):
                    writer.add_scalar(tag.replace("__", "/"), values[step], step)
    return path


def test_final_metrics_summarise_the_run_from_real_values_only(tmp_path):
    rms = {"grad_rms__output__conv1": [0.5, 0.3, 0.25, 0.75], "grad_rms__output__fc": [9.0, 1.0, 3.0, 0.1]}
    run = load_run(_run_with(tmp_path / "a", **rms, grad_decay__slope=[-0.1, -0.3, -0.2], train__loss=[2.0, 1.0],
                             val__loss=[2.0]))
    assert fm.final_metrics(run) == {fm.MIN_FIRST_LAYER_GRAD_RMS: 0.25, fm.GRAD_DECAY_SLOPE: pytest.approx(-0.2),
                                     fm.DIVERGED: 0.0}
    # A non-finite gradient: the smallest finite RMS still, and a diverged run.
    run = load_run(_run_with(tmp_path / "b", grad_rms__output__conv1=[0.5, np.nan, 0.5 ** 2], grad_rms__output__fc=[1.0] * 3))
    assert fm.final_metrics(run) == {fm.MIN_FIRST_LAYER_GRAD_RMS: 0.5 ** 2, fm.DIVERGED: 1.0}
    assert fm.final_metrics(load_run(_run_with(tmp_path / "c", train__loss=[1.0, np.nan]))) == {fm.DIVERGED: 1.0}
    # The guard's verdict with monitor=off: train/diverged at the step it stopped.
    run = load_run(_run_with(tmp_path / "d", train__loss=[1.0, 0.5], train__diverged=[1.0]))
    assert fm.final_metrics(run) == {fm.DIVERGED: 1.0}
    assert fm.final_metrics(load_run(_run_with(tmp_path / "e", epoch=[0.0]))) == {}  # nothing measured, nothing logged


def test_every_launcher_config_composes(tmp_path):
    for launcher in ("pool", "slurm", "slurm_local"):
        cfg = compose_cfg([f"hydra/launcher={launcher}"], tmp_path)
        assert get_object(cfg.hydra.launcher._target_) is not None
    cfg = compose_cfg(["hydra/launcher=slurm"], tmp_path)
    for key in ("gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "partition", "max_num_timeout"):
        assert key in cfg.hydra.launcher


def test_readme_sweep_commands(tmp_path):
    """Each command of the README's Sweeps section composes (with a sweep's first value per
    key) and names a launcher that imports; the launchers themselves run in the tests above."""
    import re
    import shlex

    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    section = readme.split("## Sweeps", 1)[1].split("\n## ", 1)[0]
    commands = [line.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
                for line in block.splitlines() if line.strip().startswith("python -m skipstudy.train")]
    assert len(commands) >= 5
    for command in commands:
        args = [a for a in shlex.split(command)[3:] if a != "-m"]
        args = [a.split(",")[0] if "=" in a and "[" not in a else a for a in args]
        cfg = compose_cfg(args, tmp_path)
        assert get_object(cfg.hydra.launcher._target_) is not None, command
