"""RETRO-fit: the model, chunk neighbours, scoring on the chunk grid, checkpoints."""
