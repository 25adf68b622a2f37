"""A run: models (text and vision), the trainer recipe, the runner, hints, GPUs, multi-GPU, memory and speed tools."""
