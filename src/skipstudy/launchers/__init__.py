"""Sweep support: one sweep job as a single run in a fresh process, failure reasons, and the
final per-run metrics of the TensorBoard HParams dashboard.

The Hydra launchers themselves live in ``src/hydra_plugins/skipstudy_launchers`` (Hydra
discovers launchers only in the ``hydra_plugins`` namespace package). Nothing here imports
torch at module level, so Hydra's plugin scan stays fast.
"""
