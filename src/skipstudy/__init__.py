"""skipstudy: how skip connections change gradient flow in deep convolutional networks."""

__version__ = "0.1.0"
