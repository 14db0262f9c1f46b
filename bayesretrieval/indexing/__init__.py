"""The build-index pipeline: sources -> decode -> encode + scalars -> shards -> store."""

from bayesretrieval.indexing.decode import ImageSkipped, decode_image
from bayesretrieval.indexing.embeddings_input import build_index_from_embeddings
from bayesretrieval.indexing.existing import IndexBusyError, IndexMismatchError
from bayesretrieval.indexing.export import ExportFormat, export_index
from bayesretrieval.indexing.pipeline import BuildConfig, BuildProgress, BuildReport, EmptySourceError, build_index
from bayesretrieval.indexing.sources import IMAGE_EXTENSIONS, SourceFile, walk_images
from bayesretrieval.skips import SkipReason

__all__ = [
    "IMAGE_EXTENSIONS",
    "BuildConfig",
    "BuildProgress",
    "BuildReport",
    "EmptySourceError",
    "ExportFormat",
    "ImageSkipped",
    "IndexBusyError",
    "IndexMismatchError",
    "SkipReason",
    "SourceFile",
    "build_index",
    "build_index_from_embeddings",
    "decode_image",
    "export_index",
    "walk_images",
]
