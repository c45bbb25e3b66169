"""Gradient-flow monitor: per-layer and per-block gradient and activation statistics.

``sums`` holds the exact reductions the hooks take, ``quantities`` what is computed from
them (statistics and quantities, both registries), ``layers`` which modules are tapped,
``taps`` the framework-free hooks (:class:`LayerTaps`) that a plain PyTorch loop drives,
``callback`` the Lightning adapter (when), ``writers`` where (TensorBoard, JSON/CSV, figures).
"""

from skipstudy.monitor.callback import GradientFlowMonitor
from skipstudy.monitor.quantities import QUANTITIES, STATISTICS, quantity, statistic
from skipstudy.monitor.taps import LayerTaps

__all__ = ["GradientFlowMonitor", "LayerTaps", "QUANTITIES", "STATISTICS", "quantity", "statistic"]
