"""Where things are: the package's ``conf/`` folder and the names of files in a run directory.

A leaf module (it imports nothing from skipstudy), so the entry points, the run-directory
code, the resume code and the probes can all use these names without importing each other.
"""

from __future__ import annotations

from pathlib import Path

CONFIG = Path(".hydra") / "config.yaml"
LAST = Path("checkpoints") / "last.ckpt"
EVENT_PREFIX = "events.out.tfevents."


def conf_dir() -> str:
    """The config folder: packaged inside a wheel, at the repository top in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"skipstudy's conf/ folder was not found next to {here}; reinstall the package")
