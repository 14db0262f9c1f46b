"""Exporting an index to other tools' layouts (clip-retrieval / embedding-reader / autofaiss)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bayesretrieval.store import IndexReader
from bayesretrieval.store.format import SCALAR_COLUMNS

DEFAULT_ROWS_PER_FILE = 1_000_000


class ExportFormat(str, Enum):
    """Layouts ``bayesretrieval export`` writes."""

    CLIP_RETRIEVAL = "clip-retrieval"
    """``img_emb/img_emb_{N}.npy`` (float16, L2-normalised means) row-aligned with
    ``metadata/metadata_{N}.parquet`` (``image_path``, ``item_id``, uncertainty columns)."""


def export_index(
    index_dir: str | Path,
    out_dir: str | Path,
    export_format: ExportFormat | str = ExportFormat.CLIP_RETRIEVAL,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
) -> list[Path]:
    """Write the current version of an index in another layout.

    Args:
        index_dir: the index directory.
        out_dir: where to write (created).
        export_format: an :class:`ExportFormat` or its name.
        rows_per_file: rows per embedding/metadata file pair.

    Returns:
        The files written.
    """
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be at least 1, got {rows_per_file}")
    return _EXPORTERS[ExportFormat(export_format)](IndexReader.open(index_dir), Path(out_dir), rows_per_file)


def _export_clip_retrieval(reader: IndexReader, out_dir: Path, rows_per_file: int) -> list[Path]:
    (out_dir / "img_emb").mkdir(parents=True, exist_ok=True)
    (out_dir / "metadata").mkdir(parents=True, exist_ok=True)
    spec = reader.manifest.variance_spec
    extra = [c for c, present in (("variance_diag", spec.has_diag), ("variance_lowrank", spec.has_lowrank)) if present]
    meta = reader.read_items(columns=["item_id", "path", *SCALAR_COLUMNS, *extra])
    meta = meta.rename_columns(["item_id", "image_path", *SCALAR_COLUMNS, *extra])
    meta = meta.append_column("expected_norm", pa.array(reader.expected_norm(), pa.float64()))
    written = []
    for number, start in enumerate(range(0, max(len(reader), 1), rows_per_file)):
        stop = min(start + rows_per_file, len(reader))
        means = np.asarray(reader.means[start:stop], dtype=np.float32)
        norms = np.linalg.norm(means, axis=1, keepdims=True)
        unit = (means / np.maximum(norms, 1e-12)).astype(np.float16)
        emb_file = out_dir / "img_emb" / f"img_emb_{number}.npy"
        meta_file = out_dir / "metadata" / f"metadata_{number}.parquet"
        np.save(emb_file, unit)
        pq.write_table(meta.slice(start, stop - start), meta_file)
        written += [emb_file, meta_file]
    return written


_EXPORTERS = {ExportFormat.CLIP_RETRIEVAL: _export_clip_retrieval}
