"""Write a world to disk as an ordinary image folder, and read it back.

Layout under ``root``::

    images/000/000000.png ...   one file per image, 1,000 per sub-folder
    world.parquet               one row per image: item_id, path (relative to images/),
                                caption, attributes, texture, shifted
    world.json                  manifest: format version, seed, part, split, shift, ...

Index ``root/images`` exactly as a folder of user photos; join results back to the
table on ``path``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from bayesretrieval import __version__
from bayesretrieval.options import IMAGES_DIR, MANIFEST_FILE, ImageFormat
from bayesretrieval.world.shifts import Shift
from bayesretrieval.world.splits import WorldSplit
from bayesretrieval.world.world import WORLD_VERSION, Part, World, scenes_from_table

FORMAT_VERSION = 1
TABLE_FILE = "world.parquet"
FILES_PER_FOLDER = 1000
MANIFEST_KEY = b"bayesretrieval.world"


_SUFFIX = {ImageFormat.PNG: ".png", ImageFormat.JPEG: ".jpg"}


def _manifest(world: World, image_format: ImageFormat) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "world_version": WORLD_VERSION,
        "library_version": __version__,
        "n_items": len(world),
        "image_size": int(world.images.shape[1]),
        "image_format": image_format.value,
        "images_dir": IMAGES_DIR,
        "part": world.part.value,
        "seed": world.seed,
        "split": world.split.to_dict(),
        "shift": world.shift.value if world.shift is not None else None,
        "severity": world.severity,
    }


def write_world(
    world: World,
    root: str | Path,
    image_format: ImageFormat | str = ImageFormat.PNG,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write images, table and manifest under ``root``.

    Args:
        world: the world to write.
        root: destination folder (created if missing).
        image_format: ``"png"`` or ``"jpeg"``.
        overwrite: replace a world already written there (its image files are
            deleted first, so no stale image outlives the new table).
        progress: called with the number of images written after each image.

    Returns:
        The root folder.

    Raises:
        FileExistsError: if ``root`` already holds a world and ``overwrite`` is false.
    """
    root = Path(root)
    image_format = ImageFormat(image_format)
    if (root / MANIFEST_FILE).exists():
        if not overwrite:
            raise FileExistsError(f"{root} already holds a world; pass overwrite=True to replace it")
        _remove_images(root)
    frame = world.table()
    paths = [
        f"{i // FILES_PER_FOLDER:03d}/{i:06d}{_SUFFIX[image_format]}" for i in frame["item_id"]
    ]
    frame.insert(1, "path", paths)
    for done, (path, image) in enumerate(zip(paths, world.images), start=1):
        target = root / IMAGES_DIR / path
        target.parent.mkdir(parents=True, exist_ok=True)
        options = {"quality": 95} if image_format is ImageFormat.JPEG else {}
        Image.fromarray(image).save(target, **options)
        if progress is not None:
            progress(done)
    manifest = _manifest(world, image_format)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    metadata = {**(table.schema.metadata or {}), MANIFEST_KEY: json.dumps(manifest).encode()}
    pq.write_table(table.replace_schema_metadata(metadata), root / TABLE_FILE)
    (root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return root


def _remove_images(root: Path) -> None:
    """Delete the image files of the world written under ``root`` (nothing else)."""
    frame, _ = read_world_table(root)
    for path in frame["path"]:
        (root / IMAGES_DIR / path).unlink(missing_ok=True)


def read_world_table(root: str | Path) -> tuple[pd.DataFrame, dict]:
    """Read the table and manifest of a written world.

    Returns:
        ``(frame, manifest)``; ``frame`` has one row per image, ``path`` relative to
        ``root/images``.
    """
    root = Path(root)
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no world manifest at {manifest_path}")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{manifest_path} has format version {manifest.get('format_version')}, "
            f"this library reads {FORMAT_VERSION}"
        )
    return pd.read_parquet(root / TABLE_FILE), manifest


def read_world(root: str | Path) -> World:
    """Read a written world back, images decoded from their files.

    PNG worlds read back pixel-exact; JPEG worlds approximately.
    """
    root = Path(root)
    frame, manifest = read_world_table(root)
    images = np.stack(
        [np.asarray(Image.open(root / IMAGES_DIR / p).convert("RGB")) for p in frame["path"]]
    )
    return World(
        scenes=scenes_from_table(frame),
        images=images,
        captions=list(frame["caption"]),
        shifted=frame["shifted"].to_numpy(dtype=bool),
        part=Part(manifest["part"]),
        seed=int(manifest["seed"]),
        split=WorldSplit.from_dict(manifest["split"]),
        shift=Shift(manifest["shift"]) if manifest["shift"] is not None else None,
        severity=int(manifest["severity"]),
    )
