"""Names of things in a run directory, and the package's ``conf/`` folder.

A leaf: it imports nothing from skipstudy, so every other module may use these names.
"""

from __future__ import annotations

from pathlib import Path

CONFIG = Path(".hydra") / "config.yaml"
LAST = Path("checkpoints") / "last.ckpt"
EVENT_PREFIX = "events.out.tfevents."


def conf_dir() -> str:
    """Packaged inside a wheel, at the repository top in a checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"skipstudy's conf/ folder was not found next to {here}; reinstall the package")
