"""Training: sharding rules, optimizer, loss, train step, checkpoints and metrics for `launch/train.py`."""
