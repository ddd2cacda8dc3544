"""The trainer layer: the run configuration and its recipes, the run directory, checkpoints, the run log, the epoch
loop, evaluation, export, and ``run.train``, which reads as the run's phases."""
