"""Reproduce the project's headline results on a CPU and write them to docs/results.md.

    python scripts/reproduce.py            # the full set: about 20 minutes on 2 idle cores
    python scripts/reproduce.py --quick    # the same steps on tiny settings (a smoke test)

Every number comes from the project's own command-line tools, run as a user would run them
(`python -m skipstudy.train -m ...`, `python -m skipstudy.probe ...`), and is read back from
their logs with `skipstudy.analysis` (the reader of `python -m skipstudy.report`):

1. Vanishing table: ResNet-50, skip x BN x {default, kaiming} init, one step on synthetic
   64 px images; the output-gradient norm of conv1 against fc at step 0.
2. Output-gradient RMS per layer at initialisation for CIFAR ResNets 20/56/110, plain and
   residual, BN on and off (He et al. 2016's recipe: option A shortcuts, kaiming init).
3. A short training on the real CIFAR-10 subset (../shared/data/cifar10-mini): plain-20 vs
   plain-56 and ResNet-20 vs ResNet-56 with the he2016_depth preset (He et al. 2016, Fig. 6).
4. The shattering probe against depth at initialisation, with fitted 2^-L and 1/sqrt(L)
   reference curves (Balduzzi et al. 2017).
5. The lesion probe on the residual net trained in 3 (Veit et al. 2016).
6. Post- against pre-activation ResNet-110 (He et al. 2016b) at initialisation and after a short
   training on the CIFAR-10 subset: gradient RMS per layer and the shortcut/branch split per
   block (``scripts/reproduce_preact.py``).

Outputs: ``<out>/results.md`` and ``<out>/results/*.png`` (small PNGs), default ``docs/``; the
runs themselves go to ``--work`` (default: a fresh ``logs/reproduce_<time>/``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import io
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import reproduce_preact  # beside this script (section 6)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CIFAR = REPO.parent / "shared" / "data" / "cifar10-mini"
MAX_PNG_BYTES = 100_000


@dataclass(frozen=True)
class Settings:
    """What each section runs; ``--quick`` swaps in tiny versions of the same steps."""

    vanish_image_size: int
    vanish_norms: str
    vanish_inits: str
    profile_depths: str
    train_depths: str
    train_steps: int
    train_batch: int
    shatter_depths: str
    shatter_points: int
    lesion_samples: int
    preact_depth: int
    preact_steps: int


FULL = Settings(vanish_image_size=64, vanish_norms="batch,none", vanish_inits="default,kaiming",
                profile_depths="20,56,110", train_depths="20,56", train_steps=200, train_batch=64,
                shatter_depths="8,14,20,32,56,110", shatter_points=256, lesion_samples=2,
                preact_depth=110, preact_steps=60)
QUICK = Settings(vanish_image_size=32, vanish_norms="none", vanish_inits="default",
                 profile_depths="8", train_depths="8,14", train_steps=4, train_batch=250,
                 shatter_depths="8,14,20", shatter_points=16, lesion_samples=1, preact_depth=20, preact_steps=4)
# Section 6: the paper's warm-up rate for ResNet-110 (0.01 at batch 128), doubled: 60 steps at 0.1 send
# a 110-layer net's loss up before it comes down, and the section is about gradients, not accuracy.
PREACT_LR = 0.02


# ---------------------------------------------------------------------- running the tools


class Runner:
    """Runs the project's CLIs as subprocesses, each command and its output kept in ``work``."""

    def __init__(self, work: Path, threads: int | None = None) -> None:
        self.work = work
        self.commands: list[str] = []
        self.timings: dict[str, float] = {}
        self.reused: list[str] = []
        self.ran = False
        self.env = dict(os.environ)
        if threads:
            # On a machine shared with other jobs, torch's OpenMP threads spin-wait for cores that
            # other processes hold; one thread per process avoids that (and is slower on idle cores).
            self.env["OMP_NUM_THREADS"] = str(threads)

    def __call__(self, section: str, module: str, *args: str) -> None:
        cmd = [sys.executable, "-m", module, *args]
        shown = " ".join(shlex.quote(a) for a in ["python", "-m", module, *args])
        self.commands.append(shown)
        log = self.work / f"{section}.log"
        done = self.work / f"{section}.done"
        # A rerun with the same --work keeps the sections that finished with the same command, up
        # to the first one that runs again (later sections may read its runs: the lesion probe).
        # The marker holds the command and the seconds it took.
        if not self.ran and done.is_file() and done.read_text().split("\n")[0] == shown:
            lines = done.read_text().split("\n")
            print(f"[{section}] done before, kept: {shown}", flush=True)
            self.reused.append(section)
            self.timings[section] = float(lines[1]) if len(lines) > 1 and lines[1] else math.nan
            return
        self.ran = True
        print(f"[{section}] {shown}", flush=True)
        # An earlier attempt's runs of this section (another command, or unfinished): the CLI
        # never writes into an existing run directory, so they go first.
        shutil.rmtree(self.work / section, ignore_errors=True)
        done.unlink(missing_ok=True)
        start = time.perf_counter()
        with open(log, "a") as f:
            proc = subprocess.run(cmd, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT, text=True)
        self.timings[section] = self.timings.get(section, 0.0) + time.perf_counter() - start
        if proc.returncode != 0:
            tail = log.read_text()[-3000:]
            raise SystemExit(f"reproduce: `{shown}` failed with status {proc.returncode}; its output ({log}):\n{tail}")
        done.write_text(f"{shown}\n{self.timings[section]:.1f}")


COMMON = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "seed=0"]
# Sweep jobs numbered rather than named by their (long) overrides, which are cut at 200 characters;
# the runs' own .hydra/ configs say what each one is.
NUMBERED = "hydra.sweep.subdir=job${hydra.job.num}"
NO_CHECKPOINTS = ["checkpoint.save_last=false", "checkpoint.save_top_k=0"]
AT_INIT = ["trainer.max_steps=1", "trainer.limit_val_batches=0", "monitor.hist_every_n_epochs=0",
           "monitor.figure=false", *NO_CHECKPOINTS]


def cifar_args(root: Path) -> list[str]:
    # The shared copy is a real subset: its MD5 sums differ from the release (dataset.verify=false).
    return ["dataset=cifar10", f"dataset.root={root}", "dataset.verify=false"]


# ---------------------------------------------------------------------- figures


def save_png(fig, path: Path, dpi: int = 72) -> Path:
    """Save a matplotlib figure as a small palette PNG (well under MAX_PNG_BYTES)."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    img.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    size = path.stat().st_size
    if size > MAX_PNG_BYTES:
        raise SystemExit(f"reproduce: {path} is {size} bytes; lower its dpi")
    return path


def new_figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h))


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


# ---------------------------------------------------------------------- 1. vanishing table


def vanishing(run, s: Settings, work: Path) -> tuple[list[str], list[dict]]:
    sweep = work / "vanishing"
    run("vanishing", "skipstudy.train", "-m", f"hydra.sweep.dir={sweep}", NUMBERED, "model=resnet50",
        "model.skip=false,true", f"model.norm={s.vanish_norms}", f"model.init={s.vanish_inits}",
        "dataset=synthetic", f"dataset.image_size={s.vanish_image_size}", "dataset.num_train=8",
        "dataset.num_val=8", "dataset.batch_size=8", "monitor.layers=[conv1,fc]", *AT_INIT, *COMMON)
    from skipstudy.analysis.logs import read_runs

    runs, _ = read_runs([sweep])
    rows = []
    for r in runs:
        conv1 = r.series("grad_norm/output/conv1").values[0]
        fc = r.series("grad_norm/output/fc").values[0]
        rms1 = r.series("grad_rms/output/conv1").values[0]
        rmsfc = r.series("grad_rms/output/fc").values[0]
        rows.append({"skip": r.option("model.skip"), "norm": r.option("model.norm"), "init": r.option("model.init"),
                     "conv1": conv1, "fc": fc, "ratio": conv1 / fc if fc > 0 else math.nan,
                     "rms_ratio": rms1 / rmsfc if rmsfc > 0 else math.nan})
    rows.sort(key=lambda d: (d["skip"], d["norm"] != "none", d["init"]))
    lines = ["| skip | BN | init | ‖dL/d conv1 out‖ | ‖dL/d fc out‖ | conv1 / fc (norm) | conv1 / fc (RMS) |",
             "|---|---|---|---|---|---|---|"]
    for d in rows:
        lines.append(f"| {'yes' if d['skip'] else 'no'} | {'yes' if d['norm'] == 'batch' else 'no'} | {d['init']} | "
                     f"{_fmt(d['conv1'])} | {_fmt(d['fc'])} | **{_fmt(d['ratio'])}** | {_fmt(d['rms_ratio'])} |")
    return lines, rows


# ---------------------------------------------------------------------- 2. RMS against depth at init


def depth_profile(run, s: Settings, work: Path, cifar: Path, out: Path) -> tuple[Path, list[dict]]:
    sweep = work / "depth_profile"
    run("depth_profile", "skipstudy.train", "-m", f"hydra.sweep.dir={sweep}", NUMBERED, "model=cifar_resnet",
        f"model.depth={s.profile_depths}", "model.skip=false,true", "model.norm=batch,none", "model.init=kaiming",
        *cifar_args(cifar), "dataset.batch_size=32", *AT_INIT, *COMMON)
    from skipstudy.analysis.logs import read_runs

    runs, _ = read_runs([sweep])
    depths = sorted({r.depth for r in runs})
    colours = {d: f"C{i}" for i, d in enumerate(depths)}
    fig = new_figure(10, 3.6)
    axes = fig.subplots(1, 2, sharey=True)
    summary = []
    for ax, norm in zip(axes, ("batch", "none")):
        for r in sorted(runs, key=lambda r: (r.depth, not r.skip)):
            if r.option("model.norm") != norm:
                continue
            series = r.layer_series("grad_rms/output")
            y = np.array([sv.values[0] for sv in series.values()])
            # The convolutions only: fc's RMS is per logit, orders of magnitude above (in the table).
            conv = np.array([name != "fc" for name in series])
            x = np.arange(1, conv.sum() + 1)
            shown = np.where(y[conv] > 0, y[conv], np.nan)
            ax.plot(x, shown, "-" if r.skip else "--", color=colours[r.depth], lw=1.2,
                    label=f"{'ResNet' if r.skip else 'plain'}-{r.depth}")
            summary.append({"depth": r.depth, "skip": r.skip, "norm": norm, "first": y[0], "last": y[-1],
                            "zeros": int((y == 0).sum())})
        ax.set_yscale("log")
        ax.set_title(f"BN {'on' if norm == 'batch' else 'off'} (kaiming init, step 0)", fontsize=10)
        ax.set_xlabel("conv layer (forward order from conv1)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("RMS of dL/d(layer output)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("Output-gradient RMS per layer at initialisation (solid: ResNet, dashed: plain)", fontsize=10)
    fig.tight_layout()
    return save_png(fig, out / "depth_profile.png"), summary


# ---------------------------------------------------------------------- 3. short CIFAR-10 training


def train_lr(s: Settings) -> float:
    """He et al.'s lr 0.1 at batch 128, scaled linearly to this batch size (Goyal et al. 2017):
    at batch 64 the preset's 0.1 sends both 56-layer nets' loss above 15 in the first steps,
    and they stay at chance."""
    return 0.1 * s.train_batch / 128


def training(run, s: Settings, work: Path, cifar: Path, out: Path) -> tuple[Path, list[dict], dict]:
    sweep = work / "training"
    run("training", "skipstudy.train", f"hydra.sweep.dir={sweep}", NUMBERED, "experiment=he2016_depth",
        f"model.depth={s.train_depths}", *cifar_args(cifar),
        f"dataset.batch_size={s.train_batch}", f"optimizer.lr={train_lr(s):g}", f"trainer.max_steps={s.train_steps}", *COMMON)
    from skipstudy.analysis.figures import training_curves
    from skipstudy.analysis.logs import final_train_loss, final_val_acc, read_runs

    runs, _ = read_runs([sweep])
    fig = training_curves(runs)
    png = save_png(fig, out / "training.png", dpi=56)
    rows = []
    for r in runs:
        loss = r.series("train/loss")
        # The mean over the last 10% of steps: less noisy than the last epoch on 1,000 images.
        tail = loss.values[-max(1, len(loss.values) // 10):]
        rows.append({"depth": r.depth, "skip": r.skip, "epoch_loss": final_train_loss(r), "tail_loss": float(np.mean(tail)),
                     "val_acc": final_val_acc(r), "steps": r.num_steps, "path": r.path})
    rows.sort(key=lambda d: (d["skip"], d["depth"]))
    return png, rows, {(d["skip"], d["depth"]): d for d in rows}


# ---------------------------------------------------------------------- 4. shattering vs depth


def fit_reference(depths: np.ndarray, values: np.ndarray, kind: str) -> tuple[float, float | None]:
    """Least squares in log space. ``2^-L``: ``y = a * 2^(-L / scale)`` (a and scale fitted;
    scale = 1 is Balduzzi et al.'s rate per layer); ``1/sqrt(L)``: ``y = a / sqrt(L)``."""
    logy = np.log(values)
    if kind == "exp":
        slope, intercept = np.polyfit(depths, logy, 1)
        scale = -math.log(2) / slope if slope < 0 else math.inf
        return math.exp(intercept), scale
    a = math.exp(float(np.mean(logy + 0.5 * np.log(depths))))
    return a, None


def shattering(run, s: Settings, work: Path, cifar: Path, out: Path) -> tuple[Path, list[dict], dict]:
    sweep = work / "shattering"
    run("shattering", "skipstudy.probe", "-m", f"hydra.sweep.dir={sweep}", NUMBERED, "probe=shattering", "model=cifar_resnet",
        f"model.depth={s.shatter_depths}", "model.skip=false,true", "model.init=kaiming", *cifar_args(cifar),
        f"probe.points={s.shatter_points}", "device=cpu", "seed=0")
    from skipstudy.probes.comparison import collect

    records = collect(sweep, "shattering")
    fig = new_figure(10, 3.6)
    ax_len, ax_lag = fig.subplots(1, 2)
    fits = {}
    for skip, style, kind in ((False, "--", "exp"), (True, "-", "sqrt")):
        rs = sorted((r for r in records if r["model"]["skip"] == skip), key=lambda r: r["depth"])
        L = np.array([r["depth"] for r in rs], dtype=float)
        y = np.array([r["corr_length"] for r in rs], dtype=float)
        label = "ResNet" if skip else "plain"
        ax_len.plot(L, y, style, marker="o", color="C0" if skip else "C3", label=f"{label} (measured)")
        ax_lag.plot(L, [r["acf_lag1"] for r in rs], style, marker="o", color="C0" if skip else "C3", label=label)
        ok = y >= 1.0  # below one point the probe cannot resolve the length (see the text)
        if ok.sum() >= 2:
            a, scale = fit_reference(L[ok], y[ok], kind)
            grid = np.linspace(L[ok].min(), L[ok].max(), 100)  # drawn over the fitted depths only
            ref = a * 2.0 ** (-grid / scale) if kind == "exp" else a / np.sqrt(grid)
            text = f"fit {a:.3g}·2^(-L/{scale:.3g})" if kind == "exp" else f"fit {a:.3g}/sqrt(L)"
            ax_len.plot(grid, ref, ":", color="C0" if skip else "C3", label=text)
            pred = a * 2.0 ** (-L[ok] / scale) if kind == "exp" else a / np.sqrt(L[ok])
            fits[skip] = {"a": a, "scale": scale, "rel_err": float(np.max(np.abs(pred / y[ok] - 1)))}
    ax_len.set_yscale("log")
    ax_len.set_xlabel("depth L (weighted layers)")
    ax_len.set_ylabel("correlation length (points, 1/e)")
    ax_len.set_title(f"input-gradient correlation length ({s.shatter_points} points)", fontsize=10)
    ax_len.legend(fontsize=7)
    ax_lag.set_xlabel("depth L (weighted layers)")
    ax_lag.set_ylabel("autocorrelation at lag 1")
    ax_lag.set_title("neighbouring input gradients' correlation", fontsize=10)
    ax_lag.legend(fontsize=7)
    for ax in (ax_len, ax_lag):
        ax.grid(True, alpha=0.3)
    fig.suptitle("Shattered gradients at initialisation (CIFAR ResNets, BN, kaiming init)", fontsize=10)
    fig.tight_layout()
    records.sort(key=lambda r: (r["model"]["skip"], r["depth"]))
    return save_png(fig, out / "shattering.png"), records, fits


# ---------------------------------------------------------------------- 5. lesion


def lesion(run, s: Settings, run_dir: Path, depth: int, out: Path) -> tuple[Path, dict]:
    import json

    run("lesion", "skipstudy.probe", "probe=lesion", f"ckpt={run_dir}", "probe.batches=null",
        f"probe.samples={s.lesion_samples}", "device=cpu")
    from skipstudy.probes.lesion import plot

    (path,) = sorted((run_dir / "probes" / "lesion").glob("lesion_step*.json"))[-1:]
    record = json.loads(path.read_text())
    blocks = record["blocks"]
    fig = plot([b["name"] for b in blocks], [b["acc"] for b in blocks], [b["downsampling"] for b in blocks],
               record["acc_intact"], record["deleted_k"],
               title=f"ResNet-{depth} of section 3, {path.stem.replace('_step', ' at step ')}")
    return save_png(fig, out / "lesion.png", dpi=64), record


# ---------------------------------------------------------------------- 6. post against pre-activation


def preact_section(run, s: Settings, work: Path, cifar: Path, figs: Path) -> list[str]:
    """Section 6's runs, figure and text (``scripts/reproduce_preact.py``)."""
    runs = reproduce_preact.run_section(run, work, s.preact_depth, s.preact_steps, s.train_batch, PREACT_LR,
                                        [*cifar_args(cifar), "dataset.num_workers=0"], COMMON, NO_CHECKPOINTS, NUMBERED)
    results = [reproduce_preact.measure(r) for r in runs]
    png = reproduce_preact.figure(results, new_figure, save_png, figs / "preact.png")
    return reproduce_preact.markdown(results, f"results/{png.name}", s.preact_steps, s.train_batch, PREACT_LR, _fmt)


# ---------------------------------------------------------------------- the document


def portable(command: str, work: Path, cifar: Path) -> str:
    """A command as it reads from the repository root: the work folder as $WORK, the data
    relative to the repository."""
    command = command.replace(str(work), "$WORK")
    return command.replace(str(cifar), os.path.relpath(cifar, REPO))


def versions() -> dict:
    from skipstudy.runs.dirs import run_info

    return run_info()


def cmd_line(args) -> str:
    return " ".join(["python scripts/reproduce.py", *(["--quick"] if args.quick else []),
                     *(["--only-preact"] if args.only_preact else []),
                     *([f"--train-steps {args.train_steps}"] if args.train_steps is not None else []),
                     *([f"--threads {args.threads}"] if args.threads else [])])


def write_results(out: Path, args, s: Settings, runner: Runner, sections: dict, started: dt.datetime) -> Path:
    info = versions()
    v_lines, v_rows = sections["vanishing"]
    prof_png, prof = sections["depth_profile"]
    train_png, train_rows, by = sections["training"]
    shat_png, shat, fits = sections["shattering"]
    les_png, les = sections["lesion"]
    rel = lambda p: Path(p).relative_to(out).as_posix()  # noqa: E731
    cmd = cmd_line(args)
    pk = info["packages"]
    md = [
        "# Results",
        "",
        f"Written by `{cmd}` on {started:%Y-%m-%d %H:%M} UTC; its runs took {np.nansum(list(runner.timings.values())) / 60:.1f} min "
        f"({os.cpu_count()} CPU cores, {info['device']}; load average {args.load_at_start} at the start and "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} at the end of this invocation, from other jobs on the "
        f"same cores{'; sections kept from an earlier invocation ran before it, see the seconds at the end' if runner.reused else ''}).",
        f"Commit `{(info.get('git_commit') or 'unknown')[:12]}`; python {info['python']}, torch {pk.get('torch')}, "
        f"torchvision {pk.get('torchvision')}, lightning {pk.get('lightning')}, hydra-core {pk.get('hydra-core')}, "
        f"numpy {pk.get('numpy')}.",
        "",
        "Each section runs the project's own commands (listed at the end) and reads their logs back with "
        "`skipstudy.analysis`, as `python -m skipstudy.report` does. These are short CPU runs on small data: "
        "they show what a laptop can show, and each section says where that falls short of the published result.",
    ]
    if args.quick:
        md += ["", "**Smoke mode (`--quick`)**: tiny networks and a few steps; the numbers below say nothing "
               "about the science."]

    # 1
    plain_nobn = [d for d in v_rows if not d["skip"] and d["norm"] == "none" and d["init"] == "default"]
    md += ["", "## 1. Vanishing gradients at step 0: ResNet-50", "",
           f"One training step of ResNet-50 on synthetic {s.vanish_image_size} px images (batch 8, seed 0); "
           "the monitor's output-gradient norm of `conv1` divided by that of `fc` (the loss gradient at the "
           "logits), and the same ratio of per-element RMS.", "", *v_lines, ""]
    if plain_nobn:
        r = plain_nobn[0]["ratio"]
        if r == 0:
            md.append("The plain net without BN and with PyTorch's default init logs exactly 0 at `conv1`: the value "
                      "lies below what the monitor resolves in float32, so this table cannot show how far it vanished.")
        else:
            md.append(f"Without skips, BN or a variance-preserving init the gradient at `conv1` is {_fmt(r)} of the one "
                      "at `fc` (the studies saw about 1e-21).")
        one_fix = {(True, "none", "default"): "the skips alone", (False, "batch", "default"): "BN alone",
                   (False, "none", "kaiming"): "kaiming init alone"}
        found = [f"{what} {_fmt(d['ratio'])}" for key, what in one_fix.items()
                 for d in v_rows if (d["skip"], d["norm"], d["init"]) == key]
        if found:
            md.append("With one of the three changed, conv1 / fc is: " + "; ".join(found) + ".")

    # 2
    md += ["", "## 2. Output-gradient RMS against depth at initialisation", "",
           f"CIFAR ResNets of depth {s.profile_depths.replace(',', ', ')}, plain and residual, BN on and off, "
           "kaiming init and option A shortcuts (He et al. 2016), one step on a batch of 32 real CIFAR-10 images.",
           "", f"![output-gradient RMS per layer]({rel(prof_png)})", "",
           "| net | depth | BN | RMS at conv1 | RMS at fc | conv1 / fc |", "|---|---|---|---|---|---|"]
    for d in sorted(prof, key=lambda d: (d["norm"], d["skip"], d["depth"])):
        md.append(f"| {'ResNet' if d['skip'] else 'plain'} | {d['depth']} | {'on' if d['norm'] == 'batch' else 'off'} | "
                  f"{_fmt(d['first'])} | {_fmt(d['last'])} | {_fmt(d['first'] / d['last'] if d['last'] > 0 else math.nan)} |")
    deepest = max(d["depth"] for d in prof)
    pick = {(d["skip"], d["norm"]): d for d in prof if d["depth"] == deepest}
    notes = []
    for norm, name in (("batch", "with BN"), ("none", "without BN")):
        p, r = pick.get((False, norm)), pick.get((True, norm))
        if p and r and p["first"] > 0 and r["first"] > 0:
            notes.append(f"{name}, conv1 of the plain-{deepest} net gets {_fmt(p['first'] / r['first'])} times the "
                         f"gradient RMS of the ResNet-{deepest}'s")
    if notes:
        md += ["", "All nets see the same gradient at fc (the loss gradient at the logits), so the conv1 column "
               "compares directly: " + "; ".join(notes) + ". RMS is per element: conv1's output has "
               "16·32·32 elements per image against fc's 10, so conv1/fc is below 1 even where nothing vanishes; "
               "the figure shows how the gradient changes from layer to layer."]

    # 3
    md += ["", "## 3. Training plain and residual nets of two depths on real CIFAR-10", "",
           f"The `he2016_depth` preset (SGD, momentum 0.9, weight decay 1e-4, BN, kaiming init, augmentation) "
           f"at depths {s.train_depths.replace(',', ' and ')}, batch {s.train_batch} with lr {train_lr(s):g} (the "
           f"preset's 0.1 at batch 128, scaled linearly), {s.train_steps} steps on the "
           f"1,000-image CIFAR-10 subset (validation: its 200 test images). He et al. trained 64,000 steps "
           "on 50,000 images.", "", f"![training curves]({rel(train_png)})", "",
           "| net | depth | train loss, last epoch | train loss, last 10% of steps | val acc |", "|---|---|---|---|---|"]
    for d in train_rows:
        md.append(f"| {'ResNet' if d['skip'] else 'plain'} | {d['depth']} | {_fmt(d['epoch_loss'])} | "
                  f"{_fmt(d['tail_loss'])} | {_fmt(d['val_acc'])} |")
    lo, hi = sorted({d["depth"] for d in train_rows})[:2] if len({d["depth"] for d in train_rows}) >= 2 else (None, None)
    if lo is not None:
        p_lo, p_hi, r_lo, r_hi = (by.get((sk, dd)) for sk, dd in ((False, lo), (False, hi), (True, lo), (True, hi)))
        plain_worse = p_hi["tail_loss"] > p_lo["tail_loss"]
        res_ok = r_hi["tail_loss"] <= r_lo["tail_loss"]
        md += ["", f"He et al. (Fig. 6): the deeper plain net trains worse, the deeper ResNet does not. Here plain-{hi} "
               f"ends at {_fmt(p_hi['tail_loss'])} against plain-{lo}'s {_fmt(p_lo['tail_loss'])} "
               f"({'the deeper plain net trains worse, as published' if plain_worse else 'the published gap does not show in this short run'}); "
               f"ResNet-{hi} ends at {_fmt(r_hi['tail_loss'])} against ResNet-{lo}'s {_fmt(r_lo['tail_loss'])} "
               f"({'lower, as published' if res_ok else 'higher: the published advantage of the deeper ResNet does not show in this short run'}). "
               f"{s.train_steps} steps on 1,000 images is the start of the paper's curves (their ResNet-56 passes "
               "ResNet-20 only after thousands of steps), and these are single-seed losses on a small set."]

    # 4
    md += ["", "## 4. Shattered gradients against depth (Balduzzi et al. 2017)", "",
           f"The `shattering` probe at initialisation (BN calibrated on the line, kaiming init): the gradient of logit 0 "
           f"w.r.t. the input at {s.shatter_points} points on the line between two CIFAR-10 test images, and the "
           "length (in points) over which its autocorrelation stays above 1/e. Balduzzi et al.: plain nets decorrelate "
           "like 2^-L, residual nets like 1/sqrt(L). The dotted lines are least-squares fits (log space) of "
           "a·2^(-L/s) to the plain nets and a/sqrt(L) to the ResNets, over the depths whose length is at least one "
           "point.", "", f"![shattering]({rel(shat_png)})", "",
           "| net | depth | correlation length (points) | lag-1 autocorrelation |", "|---|---|---|---|"]
    for r in shat:
        md.append(f"| {'ResNet' if r['model']['skip'] else 'plain'} | {r['depth']} | {_fmt(r['corr_length'])} | {_fmt(r['acf_lag1'])} |")
    if False in fits:
        f = fits[False]
        md += ["", f"Plain fit: a = {_fmt(f['a'])}, s = {_fmt(f['scale'])} layers per halving (the theory's s = 1 is a "
               f"per-layer rate for idealised ReLU nets), worst relative error {_fmt(f['rel_err'], 2)}."]
    if True in fits:
        f = fits[True]
        md += [f"ResNet fit: a = {_fmt(f['a'])}, worst relative error {_fmt(f['rel_err'], 2)}."]
    md += ["A correlation length below one point means neighbouring inputs' gradients are already unrelated; the "
           "probe's resolution ends there, so those depths are left out of the fits (their relative errors above are "
           "over the fitted depths)."]

    # 5
    blocks = les["blocks"]
    non_down = [b["acc"] for b in blocks if not b["downsampling"]]
    drop = les["acc_intact"] - float(np.mean(non_down)) if non_down else math.nan
    half = next((k for k in les["deleted_k"] if k["k"] == max(1, len(blocks) // 2)), None)
    md += ["", "## 5. Lesion study of the trained ResNet (Veit et al. 2016)", "",
           f"The `lesion` probe on the ResNet-{by[(True, max(d['depth'] for d in train_rows))]['depth']} of section 3: "
           f"validation accuracy (200 images) with each residual branch deleted in turn, and with k random branches "
           f"deleted ({s.lesion_samples} random sets per k).", "", f"![lesion]({rel(les_png)})", "",
           f"Intact: {_fmt(les['acc_intact'])}. Deleting one non-downsampling block costs {_fmt(drop)} on average "
           f"(worst single block: {_fmt(les['acc_one_deleted_min'])})"
           + (f"; deleting {half['k']} random blocks leaves {_fmt(half['mean'])}." if half else ".")
           + " Veit et al. saw single deletions barely matter and a smooth decay with k, on a ResNet-110 trained to "
           "about 93%; this net was trained for minutes on 1,000 images"
           + (", so its accuracy is low to begin with and the comparison is weak." if les["acc_intact"] < 0.6 else ".")]

    md += sections["preact"]  # 6

    md += ["", "## Commands", "", "Run from the repository root, in this order (`$WORK`: the folder the runs go "
           "to, `--work`):", "", "```"]
    md += [portable(c, runner.work, args.cifar_root.resolve()) for c in runner.commands]
    md += ["```", "", "Seconds per section: " + ", ".join(f"{k} {_fmt(v, 4)}" for k, v in runner.timings.items())
           + (f" ({', '.join(runner.reused)}: runs kept from an earlier invocation with the same commands)"
              if runner.reused else "") + "."]
    path = out / "results.md"
    path.write_text("\n".join(md) + "\n")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of every step (well under a minute)")
    p.add_argument("--out", type=Path, default=REPO / "docs", help="where results.md and results/*.png go (default: docs/)")
    p.add_argument("--work", type=Path, default=None, help="where the runs go (default: logs/reproduce_<time>/)")
    p.add_argument("--train-steps", type=int, default=None,
                   help=f"steps of the CIFAR-10 training in section 3 (default: {FULL.train_steps}; --quick: {QUICK.train_steps})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (OMP_NUM_THREADS); 1 helps on a machine other jobs keep busy")
    p.add_argument("--only-preact", action="store_true",
                   help="run section 6 alone and put it into the existing <out>/results.md in place of its old one")
    p.add_argument("--cifar-root", type=Path, default=DEFAULT_CIFAR,
                   help=f"a folder holding cifar-10-batches-py/ (default: {DEFAULT_CIFAR})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cifar = args.cifar_root.resolve()
    if not (cifar / "cifar-10-batches-py").is_dir():
        print(f"Error: --cifar-root={cifar} holds no cifar-10-batches-py/; pass the folder of the CIFAR-10 subset, "
              f"e.g. --cifar-root {DEFAULT_CIFAR}", file=sys.stderr)
        return 2
    if args.train_steps is not None and args.train_steps < 1:
        print(f"Error: --train-steps={args.train_steps} must be a positive integer; e.g. --train-steps 200", file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.timezone.utc)
    work = (args.work or REPO / "logs" / f"reproduce_{started:%Y-%m-%d_%H-%M-%S}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    (out / "results").mkdir(parents=True, exist_ok=True)
    args.load_at_start = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    s = QUICK if args.quick else FULL
    if args.train_steps is not None:
        s = dataclasses.replace(s, train_steps=args.train_steps)
    run = Runner(work, args.threads)
    figs = out / "results"
    if args.only_preact:
        path = reproduce_preact.replace_section(out / "results.md", preact_section(run, s, work, cifar, figs), run,
                                                lambda c: portable(c, work, cifar), started, cmd_line(args))
        print(f"wrote section 6 of {path} and {figs / 'preact.png'}; runs in {work}")
        return 0
    sections = {"vanishing": vanishing(run, s, work)}
    sections["depth_profile"] = depth_profile(run, s, work, cifar, figs)
    sections["training"] = training(run, s, work, cifar, figs)
    deepest_res = max((d for d in sections["training"][1] if d["skip"]), key=lambda d: d["depth"])
    sections["shattering"] = shattering(run, s, work, cifar, figs)
    sections["lesion"] = lesion(run, s, deepest_res["path"], deepest_res["depth"], figs)
    sections["preact"] = preact_section(run, s, work, cifar, figs)
    path = write_results(out, args, s, run, sections, started)
    print(f"wrote {path} and {len(list(figs.glob('*.png')))} figures in {figs}; runs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
