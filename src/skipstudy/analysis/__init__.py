"""Runs read back (``logs``), drawn (``figures``) and tabled (``summary``) for ``skipstudy.report``;
``callback`` puts a run's figures and chart layout into its own TensorBoard."""
