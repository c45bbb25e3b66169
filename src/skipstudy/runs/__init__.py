"""A training run: its directory, resume and stop, speed settings, and the LightningModule."""
