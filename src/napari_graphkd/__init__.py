"""napari-graphkd: fast instance segmentation by graph relation distillation."""
import os as _os

# OpenMP worker threads sleep instead of spinning when idle; must precede torch's import (see runtime.py).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.2.0"
