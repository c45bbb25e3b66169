"""Why ``runs/resume.py`` still reads Lightning's private ``_results`` (docs/architecture.md,
"still skipstudy's own"): the Lightning behaviour that reason rests on, measured on a tiny run.

A checkpoint saved in ``on_train_batch_end`` (where LastCheckpoint saves) resumes at the right
step, but the step it closes has not been written yet; saved later (just after Lightning's write,
or at the next batch's start), the resumed steps are logged one step early or late. If a Lightning
release changes either, the reach may go: these tests say so.
"""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import Logger

STEPS, SAVE_AFTER = 8, 4  # the checkpoint holds steps 0-3 trained: global_step 4


class Stop(Exception):
    """The kill: raised right after the checkpoint is written."""


class StepModel(BoringModel):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("trained", float(self.global_step), on_step=True, on_epoch=False)  # the step it trains
        return out


class Recorder(Logger):
    """Every write as ``(step written at, step logged)``; ``save_in_write`` saves inside the write
    of step 3, the first moment after Lightning has written it."""

    name, version, experiment = "recorder", 0, None

    def __init__(self, path=None) -> None:
        super().__init__()
        self.rows, self.path, self.trainer = [], path, None

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, int(metrics["trained"])))
        if self.path and step == SAVE_AFTER - 1:
            self.trainer.save_checkpoint(self.path)
            raise Stop


class SaveIn(Callback):
    def __init__(self, hook: str, path) -> None:
        self.hook, self.path = hook, path

    def on_train_batch_end(self, trainer, *args) -> None:
        self._maybe(trainer, "on_train_batch_end")

    def on_train_batch_start(self, trainer, *args) -> None:
        self._maybe(trainer, "on_train_batch_start")

    def _maybe(self, trainer, hook: str) -> None:
        if hook == self.hook and trainer.global_step == SAVE_AFTER:
            trainer.save_checkpoint(self.path)
            raise Stop


def fit(logger: Recorder, callbacks=(), ckpt_path=None) -> list[tuple[int, int]]:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=STEPS, limit_val_batches=0, logger=logger,
                        callbacks=list(callbacks), log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    logger.trainer = trainer
    try:
        trainer.fit(StepModel(), ckpt_path=ckpt_path)
    except Stop:
        pass
    return logger.rows


@pytest.mark.parametrize("where,before,after", [
    # LastCheckpoint's save point: the resume is exact, but step 3 was never written (kept pending).
    ("on_train_batch_end", [0, 1, 2], [4, 5, 6, 7]),
    # Just after Lightning wrote step 3: the resumed steps are written one step early.
    ("in_write", [0, 1, 2, 3], [3, 4, 5, 6]),
    # At the next batch's start: one step late, step 4 missing.
    ("on_train_batch_start", [0, 1, 2, 3], [5, 6, 7, 8]),
])
def test_where_a_checkpoint_is_saved_decides_the_resumed_steps(tmp_path, where, before, after):
    path = tmp_path / "last.ckpt"
    assert fit(Recorder()) == [(s, s) for s in range(STEPS)]  # uninterrupted: each step at its own step
    killed = fit(Recorder(path), []) if where == "in_write" else fit(Recorder(), [SaveIn(where, path)])
    assert [s for s, _ in killed] == before
    resumed = fit(Recorder(), ckpt_path=str(path))
    assert [s for s, _ in resumed] == after
    assert [logged for _, logged in resumed] == list(range(SAVE_AFTER, STEPS))  # the steps trained after it
