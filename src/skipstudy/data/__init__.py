"""Data modules: one module per data set, plus the device-resident batch pipeline."""
