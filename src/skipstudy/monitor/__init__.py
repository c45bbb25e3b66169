"""Gradient-flow monitor: per-layer gradient and activation statistics during training.

``quantities`` says what is computed (device tensors), ``callback`` when (a Lightning
Callback, every n steps or log-spaced), ``writers`` where (TensorBoard, JSON/CSV, figures),
``layers`` which layers (names and globs from ``monitor.layers``).
"""

from skipstudy.monitor.callback import GradientFlowMonitor
from skipstudy.monitor.quantities import QUANTITIES, quantity

__all__ = ["GradientFlowMonitor", "QUANTITIES", "quantity"]
