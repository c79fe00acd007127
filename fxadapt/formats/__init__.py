"""Checkpoint formats, one file each: ``native`` (fxadapt's own, every method), ``peft`` (PEFT's,
both ways, LoRA and (IA)^3) and ``adapterhub`` (AdapterHub's, read); ``common`` holds what they
share. ``fxadapt.checkpoint`` tells them apart and checks what they read."""
