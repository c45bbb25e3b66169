"""One figure for a whole probe sweep: plain against residual, at several depths, in one command.

``python -m skipstudy.probe -m probe=<name> model=cifar_resnet model.depth=... model.skip=true,false``
runs one job per network, each writing ``<job>/probes/<name>/<name>_step<N>.json``. At the end
of the multirun, :class:`SweepComparison` (a Hydra callback of the probe app) collects the
records of every probe module that defines ``comparison_figure(records) -> Figure`` and
``COMPARISON_COLUMNS`` (summary keys), and writes ``<sweep>/probes/<name>/<name>_comparison.png``
and a ``.json`` table (one row per job) beside it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - Hydra < 1.1
    _HydraCallback = object


def family(arch: str) -> str:
    """``cifar_resnet56`` -> ``cifar_resnet``: the architecture without its depth."""
    return re.sub(r"\d+$", "", str(arch))


def label(record: dict, with_depth: bool = False) -> str:
    """``cifar_resnet skip``, ``cifar_resnet56 plain norm=none``: what tells runs apart in a legend."""
    model = record.get("model") or {}
    skip = model.get("skip")
    parts = [str(record.get("arch", "?")) if with_depth else family(record.get("arch", "?"))]
    parts.append("skip" if skip else "plain" if skip is not None else "")
    norm = model.get("norm")
    if norm and norm != "batch":
        parts.append(f"norm={norm}")
    init = model.get("init")
    if init and init != "default":
        parts.append(f"init={init}")
    return " ".join(p for p in parts if p)


def is_plain(record: dict) -> bool:
    return "plain" in label(record).split()


def collect(root: str | Path, name: str) -> list[dict]:
    """Every run's ``name`` record under ``root`` (the latest step of each run directory)."""
    latest: dict[Path, dict] = {}
    for path in sorted(Path(root).glob(f"**/probes/{name}/{name}_step*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        run = path.parents[2]
        record["run_dir"] = str(run)
        if run not in latest or record.get("step", 0) >= latest[run].get("step", 0):
            latest[run] = record
    return list(latest.values())


def write_comparison(root: str | Path, module: ModuleType) -> Path | None:
    """Draw every record of probe ``module`` under ``root`` into ``root/probes/<name>/`` (PNG +
    JSON table); returns the PNG's path, or None when there is nothing to compare."""
    name = module.NAME
    records = collect(root, name)
    if not records:
        return None
    out = Path(root) / "probes" / name
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{name}_comparison.png"
    module.comparison_figure(records).savefig(png)
    table = [{k: r.get(k) for k in ("run_dir", "arch", "depth", "step")}
             | {k: r.get(k, (r.get("summary") or {}).get(k)) for k in module.COMPARISON_COLUMNS}
             | {"skip": (r.get("model") or {}).get("skip"), "norm": (r.get("model") or {}).get("norm")}
             for r in sorted(records, key=lambda r: (label(r), r.get("depth", 0)))]
    (out / f"{name}_comparison.json").write_text(json.dumps(table, indent=2))
    return png


class SweepComparison(_HydraCallback):
    """Hydra callback of the probe app: after a multirun, one comparison figure per probe that has one."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        from skipstudy.probes import PROBES, get_probe

        for name in PROBES:
            module = get_probe(name)
            if hasattr(module, "comparison_figure"):
                png = write_comparison(config.hydra.sweep.dir, module)
                if png is not None:
                    print(f"{name} comparison: {png}")
