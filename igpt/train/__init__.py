"""Training: the pure step, the loop with its periodic hooks, run checkpoints, metrics, and
the two tasks built on them, pretraining and fine-tuning."""
