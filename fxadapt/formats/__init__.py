"""Checkpoint formats, one file each: ``native`` (fxadapt's own, every method), ``peft`` (PEFT's,
both ways, each method its own PEFT type) and ``adapterhub`` (AdapterHub's, read); ``common`` holds what they
share. ``fxadapt.checkpoint`` tells them apart and checks what they read."""
