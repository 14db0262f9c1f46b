"""Processes of the index fault test: a writer that updates and rebuilds, readers that search.

Run as ``python index_faults.py writer ROOT UPDATES`` or ``python index_faults.py reader KIND ROOT``.
Both print ``ready`` once their imports and models are loaded. Every search a reader makes
is appended to ``ROOT/searches-KIND.jsonl`` with the version that answered it; after
every completed update the writer appends the same searches on the current version to
``ROOT/expected.jsonl``. The test compares the two.

``ROOT`` holds ``images/`` (the source folder), ``index/``, ``tiny.pt`` (the checkpoint)
and ``posterior/``; the writer's progress is ``ROOT/progress`` (updates completed).
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.options import TINY_MODEL

BASE_IMAGES = 24
QUERIES = ("a red circle", "a blue square", "noise")
FILTERS = {"all": None, "base": "base/", "new": "new/"}
READER_PAUSE_S = 0.1


def image_bytes(seed: int) -> bytes:
    """A random-noise PNG determined by ``seed``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (40 + seed % 7, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def put(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, leaving the file untouched when it already holds it."""
    if path.is_file() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(data)
    os.replace(temp, path)


def base_images(folder: Path) -> None:
    """The starting collection."""
    for i in range(BASE_IMAGES):
        put(folder / "base" / f"img_{i:03d}.png", image_bytes(i))


def mutate(folder: Path, update: int) -> None:
    """Update ``update`` of the collection: an add, a delete or a modification, in turn (idempotent)."""
    kind = update % 3
    if kind == 0:
        put(folder / "new" / f"add_{update:03d}.png", image_bytes(1000 + update))
    elif kind == 1:
        (folder / "base" / f"img_{update % BASE_IMAGES:03d}.png").unlink(missing_ok=True)
    else:
        put(folder / "base" / f"img_{(update * 7) % BASE_IMAGES:03d}.png", image_bytes(2000 + update))


def searches(searcher) -> list[dict]:
    """The fixed searches, one record each: version, label, ids and paths."""
    from bayesretrieval.queries import ItemFilter

    records = []
    for label, prefix in FILTERS.items():
        where = ItemFilter(path_prefix=prefix) if prefix else None
        found = searcher.search(list(QUERIES), k=4, where=where)
        records.append({"version": found.attrs["version"], "label": label, "ids": found.item_id.tolist(),
                        "paths": found.path.tolist()})
    return records


def append(path: Path, records: list[dict]) -> None:
    """Append JSON lines durably."""
    with open(path, "a") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in records))
        handle.flush()
        os.fsync(handle.fileno())


def record_expected(root: Path, encoder) -> None:
    """The fixed searches on the current version, as a fresh searcher answers them."""
    from bayesretrieval.queries import Searcher

    with Searcher.open(root / "index", encoder=encoder) as searcher:
        append(root / "expected.jsonl", searches(searcher))


def writer(root: Path, updates: int) -> None:
    """Apply updates from ``ROOT/progress`` on, each followed by a build and its expected searches."""
    from bayesretrieval.indexing import BuildConfig, build_index
    from bayesretrieval.posterior import PosteriorPair

    encoder = ClipEncoder.from_pretrained(TINY_MODEL, root / "tiny.pt")
    posterior = PosteriorPair.load(root / "posterior")
    progress = root / "progress"
    print("ready", flush=True)
    done = int(progress.read_text()) if progress.is_file() else 0
    for update in range(done, updates):
        mutate(root / "images", update)
        build_index(root / "images", root / "index", encoder, posterior,
                    BuildConfig(batch_size=4, workers=0, shard_batches=1))
        record_expected(root, encoder)
        put(progress, str(update + 1).encode())


def reader(kind: str, root: Path) -> None:
    """Search until ``ROOT/stop`` appears.

    ``reopen`` opens a searcher per round, ``long`` keeps one for the whole run, ``auto``
    keeps one with ``auto_refresh``.
    """
    from bayesretrieval.queries import Searcher

    encoder = ClipEncoder.from_pretrained(TINY_MODEL, root / "tiny.pt")
    out = root / f"searches-{kind}.jsonl"
    kept = Searcher.open(root / "index", encoder=encoder, auto_refresh=kind == "auto") if kind != "reopen" else None
    print("ready", flush=True)
    while not (root / "stop").exists():
        try:
            if kept is None:
                with Searcher.open(root / "index", encoder=encoder) as searcher:
                    records = searches(searcher)
            else:
                records = searches(kept)
        except Exception as err:  # every failure is data for the test
            records = [{"error": f"{type(err).__name__}: {err}"}]
        append(out, records)
        time.sleep(READER_PAUSE_S)


if __name__ == "__main__":
    role, *rest = sys.argv[1:]
    if role == "writer":
        writer(Path(rest[0]), int(rest[1]))
    else:
        reader(rest[0], Path(rest[1]))
