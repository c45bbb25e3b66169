"""Runs read back (``logs``), drawn (``figures``) and tabled (``summary``) for ``skipstudy.report``;
``callback`` puts a run's figures and chart layout into its own TensorBoard.

For analyses of one's own, ``load_runs(path)`` gives every scalar of a run or a sweep as one
tidy pandas table and ``load_grad_stats(run)`` one run's monitor values a row per step
(``frames``)."""

__all__ = ["load_grad_stats", "load_runs"]


def __getattr__(name: str):
    # Imported on first use: training imports this package and need not pay for pandas.
    if name in __all__:
        from skipstudy.analysis import frames

        return getattr(frames, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
