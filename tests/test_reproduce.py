"""`python scripts/reproduce.py --quick`: every step of docs/results.md, on tiny settings."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from conftest import PYTHON, REPO, cli_env


@pytest.mark.slow
def test_reproduce_quick_writes_results_with_numbers_from_the_runs(tmp_path, shared_data):
    out, work = tmp_path / "docs", tmp_path / "work"
    cmd = [PYTHON, str(REPO / "scripts" / "reproduce.py"), "--quick", "--out", str(out), "--work", str(work),
           "--cifar-root", str(shared_data / "cifar10-mini")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    md = (out / "results.md").read_text()

    # Command, versions and date.
    assert "`python scripts/reproduce.py --quick`" in md and "torch 2." in md and re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", md)
    for title in ("1. Vanishing", "2. Output-gradient RMS", "3. Training", "4. Shattered", "5. Lesion", "6. Post- against"):
        assert f"## {title}" in md

    # Every figure it links exists and is small.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == ["results/depth_profile.png", "results/lesion.png", "results/preact.png",
                             "results/shattering.png", "results/training.png"]
    for link in links:
        png = out / link
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 100_000

    # The vanishing table holds the monitor's own step-0 norms, as its export has them.
    rows = re.findall(r"^\| (no|yes) \| no \| default \| (\S+) \| (\S+) \| \*\*(\S+)\*\* \|", md, flags=re.M)
    assert {r[0] for r in rows} == {"no", "yes"}
    for skip, conv1, fc, ratio in rows:
        (run_dir,) = [d for d in (work / "vanishing").glob("job*")
                      if yaml.safe_load((d / ".hydra" / "config.yaml").read_text())["model"]["skip"] == (skip == "yes")]
        stats = json.loads((run_dir / "grad_stats.json").read_text())["series"]
        want_conv1, want_fc = stats["grad_norm/output/conv1"][0], stats["grad_norm/output/fc"][0]
        assert float(conv1) == pytest.approx(want_conv1, rel=5e-3, abs=1e-45)
        assert float(fc) == pytest.approx(want_fc, rel=5e-3)
        assert float(ratio) == pytest.approx(want_conv1 / want_fc, rel=5e-3, abs=1e-45)
    # Without skips, BN or kaiming init the gradient reaching conv1 is (at least) 1e6 times smaller
    # relative to fc than with skips.
    ratio = {skip: float(r) for skip, _, _, r in rows}
    assert ratio["no"] < 1e-6 * ratio["yes"]

    # The commands it lists are portable (no machine paths) and were the ones run.
    block = md[md.index("## Commands"):]
    assert str(work) not in block and "$WORK/training" in block
    assert "python -m skipstudy.probe probe=lesion ckpt=$WORK/training/" in block
    assert "python -m skipstudy.train hydra.sweep.dir=$WORK/preact" in block and "experiment=he2016b_preact" in block
    # Section 6's check of He et al. 2016b: in the pre-activation net the shortcut part of a block's
    # input gradient is the next block's input gradient (nothing after the addition).
    (row,) = re.findall(r"^\| pre-activation \| 0 \| .* \| (\S+)-(\S+) \(\d+ pairs\) \|$", md, flags=re.M)
    assert float(row[0]) == pytest.approx(1, abs=1e-4) and float(row[1]) == pytest.approx(1, abs=1e-4)


@pytest.mark.parametrize("args,needle", [(["--cifar-root", "/nonexistent"], "--cifar-root=/nonexistent holds no cifar-10-batches-py/"),
                                         (["--quick", "--train-steps", "0"], "--train-steps=0 must be a positive integer")])
def test_bad_arguments_are_refused_before_anything_runs(tmp_path, shared_data, args, needle):
    args = args if "--cifar-root" in args else [*args, "--cifar-root", str(shared_data / "cifar10-mini")]
    cmd = [PYTHON, str(REPO / "scripts" / "reproduce.py"), "--out", str(tmp_path / "docs"), "--work", str(tmp_path / "work"), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "docs").exists()


def test_only_preact_replaces_section_6_and_its_commands(tmp_path):
    """``--only-preact`` writes section 6 into an existing results.md: before "## Commands", in
    place of an older section 6, its command listed once with the others, the rest untouched."""
    import datetime as dt
    import sys
    from types import SimpleNamespace

    sys.path.insert(0, str(REPO / "scripts"))
    import reproduce_preact

    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\n## 5. Lesion\n\ntext five\n\n## Commands\n\nRun from the root:\n\n```\n"
                   "python -m skipstudy.train hydra.sweep.dir=$WORK/training x\n```\n\nSeconds per section: ...\n")
    when = dt.datetime(2026, 1, 2, 3, 4, tzinfo=dt.timezone.utc)
    for text in ("first", "second"):
        runner = SimpleNamespace(commands=[f"python -m skipstudy.train hydra.sweep.dir=$WORK/preact {text}"])
        section = ["", "## 6. Post- against pre-activation ResNet-110 (He et al. 2016b)", "", f"body {text}"]
        reproduce_preact.replace_section(doc, section, runner, lambda c: c, when, "python scripts/reproduce.py --only-preact")
    md = doc.read_text()
    assert md.count("## 6. ") == 1 and "body second" in md and "body first" not in md
    assert md.index("text five") < md.index("## 6. ") < md.index("## Commands")
    assert "Section 6 written by `python scripts/reproduce.py --only-preact` on 2026-01-02 03:04 UTC" in md
    block = md[md.index("```"):md.rindex("```")]
    assert block.count("$WORK/preact") == 1 and "$WORK/preact second" in block and "$WORK/training x" in block
    assert md.endswith("Seconds per section: ...\n")
