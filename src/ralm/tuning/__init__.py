"""Training loops that fit only new parameters onto a frozen pretrained LM."""
