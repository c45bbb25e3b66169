"""Section 6 of docs/results.md (``scripts/reproduce.py``): the original, post-activation ResNet
against the pre-activation one of He et al. 2016b at one depth, at initialisation and after a
short training, from the monitor's logs: output-gradient RMS per layer, the shortcut/branch split
of each block's input gradient, and the identity path's prediction checked block by block."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

CLAIM = ("He et al. 2016b (section 3, Eqs. 4-5): with identity shortcuts and nothing after the addition, "
         "x_L = x_l + Σ F(x_i) for any deeper unit L, so ∂L/∂x_l = ∂L/∂x_L · (1 + ∂/∂x_l Σ F): the gradient "
         "at any deeper unit reaches every shallower one directly, through no weight layer, and is unlikely to "
         "be cancelled (the second term is not -1 for every sample). In the original ResNet the ReLU after each "
         "addition sits on that path.")


def run_section(run, work: Path, depth: int, steps: int, batch: int, lr: float, data_args: list[str],
                common: list[str], no_checkpoints: list[str], numbered: str):
    """Train both nets with the ``he2016b_preact`` preset; the monitor records the first and the
    last step. Returns the runs as ``skipstudy.analysis`` reads them, post-activation first."""
    sweep = work / "preact"
    run("preact", "skipstudy.train", f"hydra.sweep.dir={sweep}", numbered, "experiment=he2016b_preact",
        f"model.depth={depth}", *data_args, f"dataset.batch_size={batch}", f"optimizer.lr={lr:g}",
        f"trainer.max_steps={steps}", "monitor.schedule=every", f"monitor.every_n_steps={max(1, steps - 1)}",
        "monitor.hist_every_n_epochs=0", "monitor.figure=false", *no_checkpoints, *common)
    from skipstudy.analysis.logs import read_runs

    runs, _ = read_runs([sweep])
    return sorted(runs, key=lambda r: "preact" in str(r.option("model._target_")))


def _block_input_norm(s: float, b: float, cos: float) -> float:
    """||s + b|| from the split's norms and cosine."""
    return math.sqrt(max(s * s + b * b + 2 * cos * s * b, 0.0))


def measure(r) -> dict:
    """What the section reports of one run, at the first (0) and the last recorded step (-1)."""
    rms = r.layer_series("grad_rms/output")
    convs = [n for n in rms if n != "fc"]
    split = {q: r.layer_series(f"grad_split/{q}") for q in ("shortcut", "branch", "cos", "ratio")}
    blocks = [n for n in r.blocks if n in split["ratio"]]
    out = {"name": "pre-activation" if "preact" in str(r.option("model._target_")) else "post-activation",
           "depth": r.depth, "convs": convs, "blocks": blocks}
    for i, when in ((0, "init"), (-1, "last")):
        out[when] = {
            "step": int(rms[convs[0]].steps[i]),
            "rms": np.array([rms[n].values[i] for n in convs]),
            "fc": float(rms["fc"].values[i]),
            "ratio": np.array([split["ratio"][n].values[i] for n in blocks]),
            "input": np.array([_block_input_norm(split["shortcut"][n].values[i], split["branch"][n].values[i],
                                                 split["cos"][n].values[i]) for n in blocks]),
            "shortcut": {n: float(split["shortcut"][n].values[i]) for n in blocks},
        }
        # The identity path's prediction, pair by pair: in consecutive blocks of one stage the
        # shortcut part of block l's input gradient is the gradient at its output, the next
        # block's input gradient, exactly when nothing follows the addition.
        pairs = []
        for a, b in zip(blocks, blocks[1:]):
            sa, sb = re.fullmatch(r"layer(\d+)\.(\d+)", a), re.fullmatch(r"layer(\d+)\.(\d+)", b)
            # Not from a stage's first block: its shortcut may be a projection.
            if sa and sb and sa.group(1) == sb.group(1) and int(sb.group(2)) == int(sa.group(2)) + 1 > 1:
                nxt = out[when]["input"][blocks.index(b)]
                pairs.append(out[when]["shortcut"][a] / nxt if nxt > 0 else math.nan)
        out[when]["pairs"] = np.array(pairs)
    loss = r.series("train/loss")
    tail = loss.values[-max(1, len(loss.values) // 10):] if loss is not None else np.array([math.nan])
    acc = r.series("val/acc")
    out["tail_loss"], out["val_acc"] = float(np.mean(tail)), (acc.last() if acc is not None else math.nan)
    return out


def figure(results: list[dict], new_figure, save_png, path: Path) -> Path:
    fig = new_figure(12, 3.6)
    ax_rms, ax_ratio, ax_in = fig.subplots(1, 3)
    for res, colour in zip(results, ("C3", "C0")):
        for when, style in (("init", "-"), ("last", "--")):
            m = res[when]
            label = f"{res['name']}, step {m['step']}"
            ax_rms.plot(np.arange(1, len(m["rms"]) + 1), np.where(m["rms"] > 0, m["rms"], np.nan), style,
                        color=colour, lw=1, label=label)
            x = np.arange(1, len(m["ratio"]) + 1)
            ax_ratio.plot(x, m["ratio"], style, color=colour, lw=1, label=label)
            ax_in.plot(x, m["input"] / m["input"][-1], style, color=colour, lw=1, label=label)
    ax_rms.set(yscale="log", xlabel="conv layer (forward order)", ylabel="RMS of dL/d(layer output)",
               title="output-gradient RMS per layer")
    ax_ratio.set(yscale="log", xlabel="block (forward order)", ylabel="‖shortcut part‖ / ‖branch part‖",
                 title="split of each block's input gradient")
    ax_in.set(yscale="log", xlabel="block (forward order)", ylabel="‖dL/d block input‖ / last block's",
              title="input gradient, relative to the last block")
    for ax in (ax_rms, ax_ratio, ax_in):
        ax.grid(True, alpha=0.3)
    ax_in.legend(fontsize=7)
    fig.suptitle(f"Post- against pre-activation ResNet-{results[0]['depth']} (solid: step 0, dashed: last step)",
                 fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi=60)


def markdown(results: list[dict], png: str, steps: int, batch: int, lr: float, fmt) -> list[str]:
    post, pre = results
    depth = post["depth"]
    md = ["", f"## 6. Post- against pre-activation ResNet-{depth} (He et al. 2016b)", "",
          f"The `he2016b_preact` preset: the original ResNet-{depth} (`model=cifar_resnet`, a ReLU after each "
          f"addition) and the pre-activation one (`model=preact_resnet`, BN-ReLU-conv branches, nothing after the "
          f"addition, a final BN-ReLU), both with 1x1 projections where shapes change, BN and kaiming init, "
          f"trained {steps} steps at batch {batch} with lr {lr:g} on the CIFAR-10 subset; the monitor "
          f"records the first and the last step.", "", CLAIM, "", f"![post against pre-activation]({png})", "",
          "| net | step | RMS conv1 / fc | ‖dL/dx‖ first block / last block | ‖s‖/‖b‖ median (min-max) | "
          "shortcut part of block l / input gradient of block l+1 |", "|---|---|---|---|---|---|"]
    for res in results:
        for when in ("init", "last"):
            m = res[when]
            pairs = m["pairs"][np.isfinite(m["pairs"])]
            pair_text = f"{fmt(pairs.min(), 4)}-{fmt(pairs.max(), 4)} ({len(pairs)} pairs)" if pairs.size else "n/a"
            md.append(f"| {res['name']} | {m['step']} | {fmt(m['rms'][0] / m['fc'])} | "
                      f"{fmt(m['input'][0] / m['input'][-1])} | {fmt(float(np.median(m['ratio'])))} "
                      f"({fmt(float(m['ratio'].min()))}-{fmt(float(m['ratio'].max()))}) | {pair_text} |")
    md += ["", "| net | train loss, last 10% of steps | val acc |", "|---|---|---|"]
    md += [f"| {res['name']} | {fmt(res['tail_loss'])} | {fmt(res['val_acc'])} |" for res in results]

    def spread(res, when):
        p = res[when]["pairs"]
        p = p[np.isfinite(p)]
        return float(np.max(np.abs(p - 1))) if p.size else math.nan

    pre_dev, post_dev = max(spread(pre, "init"), spread(pre, "last")), max(spread(post, "init"), spread(post, "last"))
    post_mean = float(np.nanmean(np.concatenate([post["init"]["pairs"], post["last"]["pairs"]])))
    keep = {(res["name"], w): res[w]["input"][0] / res[w]["input"][-1] for res in results for w in ("init", "last")}
    conv1 = {res["name"]: res["last"]["rms"][0] / res["last"]["fc"] for res in results}
    last_step = pre["last"]["step"]
    md += ["", "What the run shows. The last column tests the claim block by block: in the pre-activation net the "
           f"shortcut part of each block's input gradient equals the next block's input gradient to within "
           f"{fmt(pre_dev, 2)} (relative, worst pair, both steps), the identity path carrying the gradient unchanged; in "
           f"the post-activation net it is on average {fmt(post_mean)} of it (worst deviation {fmt(post_dev, 2)}): the "
           "ReLU after each addition zeroes the gradient wherever the sum was negative. Across the whole net, the "
           f"gradient at the first block's input is {fmt(keep['pre-activation', 'init'])} times that at the last block's "
           f"in the pre-activation net and {fmt(keep['post-activation', 'init'])} times in the post-activation one at "
           f"step 0; at step {last_step}, {fmt(keep['pre-activation', 'last'])} and "
           f"{fmt(keep['post-activation', 'last'])} times, and conv1's output-gradient RMS is "
           f"{fmt(conv1['pre-activation'])} of fc's against {fmt(conv1['post-activation'])}"
           + (f": after this short training the post-activation net passes {fmt(conv1['pre-activation'] / conv1['post-activation'])} "
              "times less gradient (relative to fc) to its first layer, consistent with the paper's argument. "
              if conv1["post-activation"] < conv1["pre-activation"] else
              ": here the post-activation net's first layer gets no less gradient, not what the paper's argument suggests. ")
           + f"These are {steps} steps of one seed on 1,000 images; He et al.'s accuracy claim (6.37% against 6.61% "
           f"error for ResNet-110, 4.92% against 7.61% at depth 1001) needs the full 64k-step schedule."]
    return md


def replace_section(results_md: Path, section: list[str], runner, portable, started, command: str) -> Path:
    """Put ``section`` into an existing results.md in place of its section 6 (or before
    "## Commands"), saying which invocation wrote it, and list its commands with the others."""
    if not results_md.is_file():
        raise SystemExit(f"reproduce: --only-preact needs an existing {results_md}; run without it first")
    text = results_md.read_text()
    head, sep, commands = text.partition("\n## Commands")
    head = head.split("\n## 6. ")[0].rstrip("\n")
    took = sum(runner.timings.values()) / 60 if getattr(runner, "timings", None) else math.nan
    note = (f"Section 6 written by `{command}` on {started:%Y-%m-%d %H:%M} UTC (its runs took {took:.1f} min), apart "
            "from the sections above (its commands are the last ones listed at the end).")
    section = [*section[:3], note, "", *section[3:]]
    shown = [portable(c) for c in runner.commands]
    if sep:
        block_end = commands.index("```", commands.index("```") + 3)
        old = [line for line in commands[:block_end].split("\n") if line.startswith("python -m skipstudy.train hydra.sweep.dir=$WORK/preact")]
        body = commands[:block_end]
        for line in old:
            body = body.replace(line + "\n", "")
        commands = body + "\n".join(shown) + "\n" + commands[block_end:]
    results_md.write_text(head + "\n" + "\n".join(section) + "\n" + sep + commands)
    return results_md
