"""Reading finished (or running) runs back and comparing them.

``logs`` reads event files, ``.hydra/`` and the monitor's export into ``Run`` objects,
``figures`` draws them, ``summary`` tabulates them, ``report`` is the CLI
(``python -m skipstudy.report``), and ``callback`` puts a run's own figures and a
custom-scalars layout into its TensorBoard during training.

Importing this package is cheap (no matplotlib, no tbparse): train.py imports the callback.
"""
