"""Training entry points (``python -m train``): config, data (grain), MQAR, checkpoints, loop."""
