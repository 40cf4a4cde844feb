"""Out-of-core segmentation: chunked network and decoding with halos, stitched into global ids in Zarr."""
from .run import ChunkError, DaskExecutor, Progress, ThreadExecutor, run_to_end, segment_large
from .zarr_io import LabelsTarget, Source, default_target, from_array, open_image

__all__ = ["ChunkError", "DaskExecutor", "LabelsTarget", "Progress", "Source", "ThreadExecutor", "default_target",
           "from_array", "open_image", "run_to_end", "segment_large"]
