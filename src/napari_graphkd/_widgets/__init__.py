"""napari glue of napari-graphkd (the library itself never imports napari or Qt)."""
from ._finetune import FinetuneWidget
from ._overlays import OverlaysWidget
from ._segment import SegmentWidget

__all__ = ["FinetuneWidget", "OverlaysWidget", "SegmentWidget"]
