"""Training: the toy-world models (and, later, LoRA / DreamBooth / the inverter)."""
