"""Graph passes that are no adapter method: the insert driver (``insert``), dropout made
mode-aware (``dropout``), and the optimisations and checks run on rebuilt graphs (``fuse``).
The methods' own rules live in ``fxadapt.methods``."""
