"""napari-graphkd: fast instance segmentation by graph relation distillation."""
__version__ = "0.2.0"
