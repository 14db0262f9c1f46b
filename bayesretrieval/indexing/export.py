"""Exporting an index to other tools' layouts (clip-retrieval / embedding-reader / autofaiss).

An export folder is written whole into a hidden staging folder beside it and then renamed
over the old one (:func:`bayesretrieval.atomic.publish_directory`), so re-exporting never
leaves an earlier export's extra shards behind and a crash leaves the old export or the new
one, never a mix. The marker file :data:`EXPORT_MARKER` says a folder is one of ours; any
other non-empty folder is refused rather than replaced.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bayesretrieval import __version__
from bayesretrieval.atomic import publish_directory
from bayesretrieval.options import DEFAULT_ROWS_PER_FILE, ExportFormat
from bayesretrieval.store import IndexReader
from bayesretrieval.store.format import SCALAR_COLUMNS

EXPORT_MARKER = "bayesretrieval-export.json"
"""Marker file inside an export folder: format, index version, item count, files written."""

EXPORT_MARKER_VERSION = 1
"""Layout version of :data:`EXPORT_MARKER` (its ``marker_version`` key)."""


def export_index(
    index_dir: str | Path,
    out_dir: str | Path,
    export_format: ExportFormat | str = ExportFormat.CLIP_RETRIEVAL,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
) -> list[Path]:
    """Write the current version of an index in another layout, replacing ``out_dir`` whole.

    Everything is written into a hidden staging folder beside ``out_dir`` and then renamed
    over it, so ``out_dir`` ends up holding exactly this export (no shards of an earlier,
    larger export) and a crash leaves the earlier export or this one, never a mix. The
    folder also gets :data:`EXPORT_MARKER`, which is how a later export knows it may
    replace the folder.

    Args:
        index_dir: the index directory.
        out_dir: where to write: a new folder, an empty one, or an earlier export (one
            holding :data:`EXPORT_MARKER`), which is replaced.
        export_format: an :class:`ExportFormat` or its name.
        rows_per_file: rows per embedding/metadata file pair.

    Returns:
        The data files written, as paths under ``out_dir`` (the marker not included).

    Raises:
        ValueError: ``rows_per_file`` below 1, an unknown format, or ``out_dir`` being a
            file or a non-empty folder that is not an earlier export.
    """
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be at least 1, got {rows_per_file}")
    exporter = _EXPORTERS[ExportFormat(export_format)]
    out_dir = Path(out_dir)
    check_export_target(out_dir)
    reader = IndexReader.open(index_dir)

    def write(staging: Path) -> list[str]:
        names = exporter(reader, staging, rows_per_file)
        marker = {
            "marker_version": EXPORT_MARKER_VERSION,
            "format": ExportFormat(export_format).value,
            "library_version": __version__,
            "index_version": reader.manifest.version,
            "item_count": len(reader),
            "rows_per_file": rows_per_file,
            "files": names,
        }
        (staging / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        return names

    # abspath: a target named "." or ending in ".." has no name to stage beside.
    names = publish_directory(Path(os.path.abspath(out_dir)), write)
    return [out_dir / name for name in names]


def check_export_target(out_dir: Path) -> None:
    """Refuse an export target that is not ours to replace.

    Args:
        out_dir: the folder an export would replace.

    Raises:
        ValueError: ``out_dir`` is a file, or a non-empty folder without :data:`EXPORT_MARKER`
            (an export replaces the whole folder, so anything else in it would be lost).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"export target {out_dir} is a file; choose a new or empty folder")
    if out_dir.is_dir() and not (out_dir / EXPORT_MARKER).is_file() and any(out_dir.iterdir()):
        raise ValueError(
            f"export target {out_dir} is not empty and not an earlier bayesretrieval export "
            f"(no {EXPORT_MARKER}); an export replaces the whole folder, so choose an empty "
            "or new folder, or delete it first"
        )


def _export_clip_retrieval(reader: IndexReader, out_dir: Path, rows_per_file: int) -> list[str]:
    """Write clip-retrieval's layout into ``out_dir``; returns the files' paths relative to it."""
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
        emb_name = f"img_emb/img_emb_{number}.npy"
        meta_name = f"metadata/metadata_{number}.parquet"
        np.save(out_dir / emb_name, unit)
        pq.write_table(meta.slice(start, stop - start), out_dir / meta_name)
        written += [emb_name, meta_name]
    return written


_EXPORTERS = {ExportFormat.CLIP_RETRIEVAL: _export_clip_retrieval}
