"""Export training checkpoints to the diffusers (PyTorch) layout: `python -m export`."""
