"""A small procedural world with ground truth: captioned images, relevance, shifts.

Images show one or two objects (shape, colour, size, position) on a plain or textured
background; captions name every attribute; :func:`relevance_matrix` says which images
match a text query; :class:`Shift` families make test images harder or unfamiliar;
:func:`write_world` stores a world as an ordinary image folder plus a Parquet table.
"""

from bayesretrieval.world.captions import (
    ObjectQuery,
    Query,
    caption,
    full_query,
    parse_query,
    partial_query,
    query_text,
)
from bayesretrieval.world.io import ImageFormat, read_world, read_world_table, write_world
from bayesretrieval.world.recall import recall_at_ks, similarity_scores, world_recall
from bayesretrieval.world.relevance import matches, relevance_matrix
from bayesretrieval.world.render import images_to_tensor, render_scene, render_scenes
from bayesretrieval.world.scenes import ObjectPool, Scene, SceneConfig, WorldObject
from bayesretrieval.world.shifts import MAX_SEVERITY, Shift, corrupt
from bayesretrieval.world.splits import DEFAULT_SPLIT, WorldSplit, make_split
from bayesretrieval.world.vocab import Colour, Position, Shape, Size, Texture
from bayesretrieval.world.world import Part, World, iter_batches, make_world

__all__ = [
    "DEFAULT_SPLIT",
    "MAX_SEVERITY",
    "Colour",
    "ImageFormat",
    "ObjectPool",
    "ObjectQuery",
    "Part",
    "Position",
    "Query",
    "Scene",
    "SceneConfig",
    "Shape",
    "Shift",
    "Size",
    "Texture",
    "World",
    "WorldObject",
    "WorldSplit",
    "caption",
    "corrupt",
    "full_query",
    "images_to_tensor",
    "iter_batches",
    "make_split",
    "make_world",
    "matches",
    "parse_query",
    "partial_query",
    "query_text",
    "read_world",
    "read_world_table",
    "recall_at_ks",
    "relevance_matrix",
    "render_scene",
    "render_scenes",
    "similarity_scores",
    "world_recall",
    "write_world",
]
