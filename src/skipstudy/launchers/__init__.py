"""Sweep jobs as single runs, DDP inside a multirun, HParams summary metrics. No torch import at
module level here: a sweep's callback imports :mod:`.jobs` whenever the app starts."""
