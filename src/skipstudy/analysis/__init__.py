"""Runs read back (``logs``), drawn (``figures``), tabled (``summary``) and reported (``report``,
the CLI); ``callback`` puts a run's figures and chart layout into its own TensorBoard. Importing
the package is cheap: train.py imports the callback."""
