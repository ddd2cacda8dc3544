"""The step layer: one training step (``train_step``) and what runs it fast or on many processes: the optimisers,
mixed precision, CUDA-graph capture, data parallelism, and the learning-rate and λ schedules."""
