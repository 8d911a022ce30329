"""Model-free pieces every method shares: the start token, targets and windows, neighbour logs."""
