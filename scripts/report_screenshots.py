"""The report as a reader sees it: a one-epoch and a three-epoch depth sweep, their reports
(and the three-epoch one against relative depth), and a headless-browser screenshot of each
``index.html``.

    python scripts/report_screenshots.py [--work DIR] [--browser chromium]

Each sweep is ``python -m skipstudy.train -m model=cifar_resnet model.depth=8,14
model.skip=true,false`` on small synthetic images (the one-epoch sweep is the three steps with
validation off that a first try often is); about two minutes on 2 CPU cores. Screenshots go to
``<work>/screenshots/<name>.png`` (full page), each also cut into ``<name>_partN.png`` pieces a
screen high. The script fails when a figure's text leaves its canvas (matplotlib's renderer
extents, as tests/test_report_layout.py checks) or the browser writes no image. Debian:
``apt-get install chromium``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

SWEEP = ["model=cifar_resnet", "model.depth=8,14", "model.skip=true,false", "trainer.accelerator=cpu",
         "trainer.enable_progress_bar=false", "dataset.num_val=16", "dataset.batch_size=8", "dataset.image_size=16"]
LENGTHS = {
    "one_epoch": ["trainer.max_steps=3", "trainer.limit_val_batches=0", "dataset.num_train=64"],
    "three_epochs": ["trainer.max_epochs=3", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                     "dataset.num_train=32"],
}
# Flags for a headless browser with no network and no profile state of its own.
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]
WIDTH, SCREEN = 1400, 1800


def sweep(work: Path, name: str) -> Path:
    out = work / name
    if not (out / "multirun.yaml").is_file():
        subprocess.run([sys.executable, "-m", "skipstudy.train", "-m", *SWEEP, *LENGTHS[name],
                        f"hydra.sweep.dir={out}"], cwd=work, check=True, stdout=subprocess.DEVNULL)
    return out


def screenshot(browser: str, page: Path, png: Path, height: int) -> None:
    png.unlink(missing_ok=True)
    subprocess.run([browser, *BROWSER_FLAGS, f"--window-size={WIDTH},{height}", f"--screenshot={png}",
                    page.resolve().as_uri()], check=True, capture_output=True, timeout=300)
    if not png.is_file():
        raise SystemExit(f"{browser} wrote no screenshot of {page}")


def page_height(report_dir: Path) -> int:
    """Enough window height for the whole page: the figures' heights plus the tables."""
    from PIL import Image

    heights = [Image.open(p).height for p in report_dir.glob("*.png")]
    return min(30000, 1500 + sum(heights) + 400 * len(list(report_dir.glob("*.gif"))))


def cut(png: Path) -> list[Path]:
    """The page in screen-high pieces (an image viewer shrinks a 10000 px page to a smear);
    the blank bottom of the window left out."""
    from PIL import Image, ImageChops

    with Image.open(png) as im:
        page = im.convert("RGB")
    box = ImageChops.difference(page, Image.new("RGB", page.size, (255, 255, 255))).getbbox()
    page = page.crop((0, 0, page.width, box[3] + 20 if box else page.height))
    pieces = []
    for i, top in enumerate(range(0, page.height, SCREEN)):
        piece = png.with_name(f"{png.stem}_part{i}.png")
        page.crop((0, top, page.width, min(page.height, top + SCREEN))).save(piece)
        pieces.append(piece)
    return pieces


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path(f"logs/report_screenshots_{time.strftime('%Y%m%d_%H%M%S')}"))
    parser.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' figure checks
    from figure_checks import outside_canvas, silent_empty_panels
    from skipstudy.analysis.figures import run_figures
    from skipstudy.analysis.logs import read_runs
    from skipstudy.report import build_report

    shots = args.work / "screenshots"
    shots.mkdir(exist_ok=True)
    failed = []
    for name in LENGTHS:
        out = sweep(args.work, name)
        runs, _ = read_runs([out])
        for relative in (False, True):
            for stem, fig in run_figures(runs, relative_depth=relative).items():
                failed += [f"{name} {stem}: {p}" for p in outside_canvas(fig) + silent_empty_panels(fig)]
        variants = {name: False, f"{name}_relative_depth": True} if name == "three_epochs" else {name: False}
        for label, relative in variants.items():
            report = build_report([out], args.work / f"report_{label}", relative_depth=relative)
            png = shots / f"{label}.png"
            screenshot(args.browser, report.out / "index.html", png, page_height(report.out))
            print(f"{label}: {png} ({len(cut(png))} pieces)")
    for line in failed:
        print(f"clipped or silent: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
