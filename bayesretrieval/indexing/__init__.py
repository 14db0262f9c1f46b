"""The build-index pipeline: sources -> decode -> encode + scalars -> shards -> store."""

from bayesretrieval.indexing.decode import ImageSkipped, SkipReason, decode_image
from bayesretrieval.indexing.existing import IndexBusyError, IndexMismatchError
from bayesretrieval.indexing.pipeline import BuildConfig, BuildProgress, BuildReport, build_index
from bayesretrieval.indexing.sources import IMAGE_EXTENSIONS, SourceFile, walk_images

__all__ = [
    "IMAGE_EXTENSIONS",
    "BuildConfig",
    "BuildProgress",
    "BuildReport",
    "ImageSkipped",
    "IndexBusyError",
    "IndexMismatchError",
    "SkipReason",
    "SourceFile",
    "build_index",
    "decode_image",
    "walk_images",
]
