"""The shared training loop and what it owns: step context, objective, optimizers, checkpoints, run folder."""
