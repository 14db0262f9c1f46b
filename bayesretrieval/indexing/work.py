"""Resumable build state: encoded batches appended as fsync'd Parquet shards.

A build writes each group of finished batches to the ``shards/`` folder inside the
index's work folder (temp file, fsync, rename), so a build killed at any point loses at
most the batches since the last shard. The next run reads the shards back and encodes only what they lack. Rows are
keyed by ``(path, file_size, mtime_ns)``; a changed file is encoded again. A shard is
named after the keys it holds, so writers on several machines never collide and a
retried batch rewrites its own shard. The work folder remembers the settings it was
made with and is discarded when they differ.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bayesretrieval.atomic import write_atomic, write_text_atomic
from bayesretrieval.store import format as fmt

SETTINGS_FILE = "settings.json"
SHARDS_DIR = "shards"


def result_schema(embed_dim: int, variance: fmt.VarianceSpec, activation_dim: int = 0) -> pa.Schema:
    """Schema of a shard: items columns (no id) plus ``reason``/``detail`` for skips.

    Rows with a non-null ``reason`` are skipped inputs; their numeric columns are zeros.
    ``activation_dim`` ``h > 0`` adds the ``activation`` column (``--store-activations``).
    """
    items = fmt.items_schema(embed_dim, variance, activation_dim)
    fields = [f for f in items if f.name != "item_id"]
    return pa.schema(fields + [pa.field("reason", pa.string()), pa.field("detail", pa.string())])


def shard_name(table: pa.Table) -> str:
    """``shard-<hash>.parquet``: a hash of the table's ``(path, file_size, mtime_ns)`` keys.

    Two writers of different rows never pick the same name, and the same rows always get
    the same one.
    """
    digest = hashlib.sha256()
    for column in ("path", "file_size", "mtime_ns"):
        digest.update(json.dumps(table.column(column).to_pylist()).encode("utf-8"))
    return f"shard-{digest.hexdigest()[:24]}.parquet"


class WorkFolder:
    """The ``work/`` folder of one index directory.

    Args:
        index_dir: the index directory.
        settings: JSON-ready dict of everything that changes the encoded values (model,
            posterior fingerprint, variance columns, decoding limits).
    """

    def __init__(self, index_dir: str | Path, settings: dict):
        self.root = Path(index_dir) / fmt.WORK_DIR
        self.shards = self.root / SHARDS_DIR
        self.settings = settings

    def open(self) -> int:
        """Prepare the folder, discarding stale state; return the number of usable shards."""
        settings_file = self.root / SETTINGS_FILE
        if settings_file.is_file() and json.loads(settings_file.read_text()) != self.settings:
            shutil.rmtree(self.root)
        self.shards.mkdir(parents=True, exist_ok=True)
        if not settings_file.is_file():
            write_text_atomic(settings_file, json.dumps(self.settings, sort_keys=True))
        for leftover in self.shards.glob(".*"):
            leftover.unlink()
        return len(self._shard_files())

    def _shard_files(self) -> list[Path]:
        return sorted(self.shards.glob("shard-*.parquet"))

    def read(self, schema: pa.Schema, columns: list | None = None) -> pa.Table:
        """All rows of all shards (all or only ``columns``)."""
        tables = [pq.read_table(path, schema=schema, columns=columns) for path in self._shard_files()]
        if columns is not None:
            schema = pa.schema([schema.field(name) for name in columns])
        return pa.concat_tables(tables) if tables else schema.empty_table()

    def append(self, table: pa.Table) -> Path:
        """Write ``table`` as a shard named after its keys, durably (temp file, fsync, rename, fsync dir).

        Safe to call from several processes at once (:func:`shard_name`).
        """
        target = self.shards / shard_name(table)
        write_atomic(target, lambda handle: pq.write_table(table, handle))
        return target

    def clear(self) -> None:
        """Remove the folder (after a successful publication)."""
        shutil.rmtree(self.root, ignore_errors=True)
