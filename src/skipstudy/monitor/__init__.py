"""Gradient-flow monitor: per-layer and per-block gradient and activation statistics; the
modules' roles are in docs/architecture.md."""

from skipstudy.monitor.callback import GradientFlowMonitor
from skipstudy.monitor.quantities import QUANTITIES, STATISTICS, quantity, statistic
from skipstudy.monitor.taps import LayerTaps

__all__ = ["GradientFlowMonitor", "LayerTaps", "QUANTITIES", "STATISTICS", "quantity", "statistic"]
