"""Sweep jobs as single runs (``jobs``), DDP inside a multirun (``ddp``) and the HParams
dashboard's per-run numbers (``final_metrics``). Hydra finds the launchers themselves in
``hydra_plugins/skipstudy_launchers``. No torch import at module level: Hydra's plugin scan
imports these."""
