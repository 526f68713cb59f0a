"""Training: state, step, optimizers, sharding, checkpoints, metrics, loop."""
