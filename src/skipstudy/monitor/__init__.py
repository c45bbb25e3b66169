"""Gradient-flow monitor: per-layer gradient and activation statistics during training.

``quantities`` says what is computed (device tensors), ``callback`` when (a Lightning
Callback, every n steps or log-spaced), ``writers`` where (TensorBoard, JSON/CSV, figures),
``layers`` which layers (names and globs from ``monitor.layers``), ``residual`` which
modules are residual blocks, ``taps`` the framework-free hooks (:class:`LayerTaps`) that
both the callback and a plain PyTorch loop drive.
"""

from skipstudy.monitor.callback import GradientFlowMonitor
from skipstudy.monitor.quantities import QUANTITIES, quantity
from skipstudy.monitor.taps import LayerTaps

__all__ = ["GradientFlowMonitor", "LayerTaps", "QUANTITIES", "quantity"]
