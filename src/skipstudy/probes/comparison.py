"""One figure for a probe sweep (plain against residual, at several depths): every probe module
with ``comparison_figure(records)`` gets ``<sweep>/probes/<name>/<name>_comparison.png`` and a
``.json`` table of its ``COMPARISON_COLUMNS``, a row per job."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import matplotlib
from hydra.experimental.callback import Callback


def label(record: dict, with_depth: bool = False) -> str:
    """``cifar_resnet skip``, ``cifar_resnet56 plain norm=none``: what tells runs apart in a legend."""
    model = record.get("model") or {}
    skip, norm, init = model.get("skip"), model.get("norm"), model.get("init")
    arch = str(record.get("arch", "?"))
    parts = [arch if with_depth else re.sub(r"\d+$", "", arch), "skip" if skip else "plain" if skip is not None else "",
             f"norm={norm}" if norm and norm != "batch" else "", f"init={init}" if init and init != "default" else ""]
    return " ".join(p for p in parts if p)


def is_plain(record: dict) -> bool:
    return "plain" in label(record).split()


def by_depth(records: list[dict]) -> Iterator[tuple[dict, tuple, str]]:
    """``(record, colour, style)`` in depth order: viridis by depth, dashed for plain nets."""
    depths = sorted({r["depth"] for r in records})
    for r in sorted(records, key=lambda r: (r["depth"], label(r))):
        colour = matplotlib.colormaps["viridis"](depths.index(r["depth"]) / max(1, len(depths) - 1))
        yield r, colour, "--" if is_plain(r) else "-"


def collect(root: str | Path, name: str) -> list[dict]:
    """Every run's ``name`` record under ``root`` (the latest step of each run directory)."""
    latest: dict[Path, dict] = {}
    for path in sorted(Path(root).glob(f"**/probes/{name}/{name}_step*.json")):
        record = json.loads(path.read_text()) | {"run_dir": str(path.parents[2])}
        if path.parents[2] not in latest or record["step"] >= latest[path.parents[2]]["step"]:
            latest[path.parents[2]] = record
    return list(latest.values())


class SweepComparison(Callback):
    """Hydra callback of the probe app (``conf/probe.yaml``)."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        from skipstudy.probes import PROBES, get_probe

        for name in PROBES:
            module, records = get_probe(name), collect(config.hydra.sweep.dir, name)
            if not records or not hasattr(module, "comparison_figure"):
                continue
            out = Path(config.hydra.sweep.dir) / "probes" / name
            out.mkdir(parents=True, exist_ok=True)
            module.comparison_figure(records).savefig(out / f"{name}_comparison.png")
            table = [{k: r.get(k) for k in ("run_dir", "arch", "depth", "step")}
                     | {k: r["summary"][k] for k in module.COMPARISON_COLUMNS}
                     | {"skip": r["model"].get("skip"), "norm": r["model"].get("norm")}
                     for r in sorted(records, key=lambda r: (label(r), r["depth"]))]
            (out / f"{name}_comparison.json").write_text(json.dumps(table, indent=2))
            print(f"{name} comparison: {out / name}_comparison.png")
