"""The lines a run and a sweep end with: their numbers against the run's own files, read
independently (tbparse on the event file, the monitor's JSON export), and no start-up noise."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from tbparse import SummaryReader

from conftest import FAST, PYTHON
from skipstudy.train import train


def _num(text: str) -> float:
    return float(text)


def test_a_run_ends_with_its_summary(make_cfg, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    # The progress bar on, as a user has it: Lightning adds its own callbacks to the run's.
    cfg = make_cfg([*FAST, "trainer.enable_progress_bar=true"])
    run_dir = Path(cfg.hydra.runtime.output_dir)
    # The run's event file is read once at its end: the HParams numbers and the summary share it.
    import tbparse

    reads = []
    monkeypatch.setattr(tbparse, "SummaryReader", lambda *a, **k: reads.append(a) or SummaryReader(*a, **k))
    train(cfg, run_dir)
    assert len(reads) == 1 and list(run_dir.glob("events.out.tfevents.*")) == [Path(reads[0][0])], reads
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    out = capsys.readouterr().out
    lines = out[out.index("Run ok: "):].splitlines()[:4]

    # Where the run is (relative to the working directory) and how to open it.
    assert lines[0] == "Run ok: run"
    assert lines[3] == "  tensorboard --logdir run"

    # Final metrics: the last epoch's values in the event file.
    df = SummaryReader(str(run_dir)).scalars
    last = {tag: g.sort_values("step")["value"].iloc[-1] for tag, g in df.groupby("tag")}
    m = re.fullmatch(r"  epochs 1, steps 3: train loss (\S+), val loss (\S+), val acc (\S+)", lines[1])
    assert m, lines[1]
    assert _num(m[1]) == pytest.approx(last["train/loss_epoch"], rel=5e-3)
    assert _num(m[2]) == pytest.approx(last["val/loss"], rel=5e-3)
    assert _num(m[3]) == pytest.approx(last["val/acc"], rel=5e-3)

    # Gradient attenuation: first and last tracked layer, at step 0 and over the last epoch,
    # from the monitor's export.
    stats = json.loads((run_dir / "grad_stats.json").read_text())
    first, lastl = stats["layers"][0], stats["layers"][-1]
    a = np.asarray(stats["series"][f"grad_rms/output/{first}"], dtype=float)
    b = np.asarray(stats["series"][f"grad_rms/output/{lastl}"], dtype=float)
    m = re.fullmatch(rf"  output-gradient RMS {first} / {lastl}: (\S+) / (\S+) = (\S+) at step 0, "
                     r"(\S+) / (\S+) = (\S+) in the last epoch", lines[2])
    assert m, lines[2]
    got = [_num(v) for v in m.groups()]
    want = [a[0], b[0], a[0] / b[0], np.median(a), np.median(b), np.median(a) / np.median(b)]
    assert got == pytest.approx(want, rel=5e-3)


@pytest.mark.slow  # a real multirun subprocess of two trainings
def test_a_sweep_ends_with_its_runs_side_by_side_and_without_lightning_noise(tmp_path):
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)  # the noise test needs Python's default warning filters
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [PYTHON, "-m", "skipstudy.train", "-m", "model.skip=true,false", *FAST, "trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    # Lightning's product tips and torch's FutureWarning at Lightning's LeafSpec use are gone.
    assert "Tip:" not in text and "LeafSpec" not in text and "FutureWarning" not in text

    (sweep,) = (tmp_path / "logs" / "default").glob("multirun_*")
    out = proc.stdout[proc.stdout.index("Sweep done: "):].splitlines()
    assert out[0] == f"Sweep done: 2 runs in {sweep.relative_to(tmp_path)}"
    rows = {line.split()[0].lower(): line.split() for line in out[2:4]}
    assert set(rows) == {"model.skip=false", "model.skip=true"}
    for name, cells in rows.items():
        (run_dir,) = [d for d in sweep.iterdir() if name in d.name.lower()]
        df = SummaryReader(str(run_dir)).scalars
        loss = df[df.tag == "train/loss_epoch"]["value"].iloc[-1]
        acc = df[df.tag == "val/acc"]["value"].iloc[-1]
        stats = json.loads((run_dir / "grad_stats.json").read_text())
        a = np.asarray(stats["series"][f"grad_rms/output/{stats['layers'][0]}"], dtype=float)
        b = np.asarray(stats["series"][f"grad_rms/output/{stats['layers'][-1]}"], dtype=float)
        assert cells[3] == f"{stats['layers'][0]}/{stats['layers'][-1]}"
        assert [_num(c) for c in (cells[1], cells[2], cells[4], cells[5], cells[6], cells[7])] == pytest.approx(
            [loss, acc, np.median(a), np.median(b), np.median(a) / np.median(b), a[0] / b[0]], rel=5e-3)
    assert f"  tensorboard --logdir {sweep.relative_to(tmp_path)}" in out
    assert f"  python -m skipstudy.report {sweep.relative_to(tmp_path)}" in out
    # Each job ended with its own summary too.
    assert proc.stdout.count("Run ok: ") == 2
