"""World scenes, rendering, captions, query parsing and relevance."""

import itertools

import numpy as np
import pytest

from bayesretrieval.world import (
    Colour,
    ObjectQuery,
    Position,
    Query,
    Scene,
    Shape,
    Size,
    Texture,
    WorldObject,
    caption,
    full_query,
    make_world,
    matches,
    parse_query,
    partial_query,
    query_text,
    relevance_matrix,
    render_scene,
)
from bayesretrieval.world.render import OUTLINES
from bayesretrieval.world.vocab import COLOUR_RGB


def obj(shape, colour, size="large", position="center"):
    return WorldObject(Shape(shape), Colour(colour), Size(size), Position(position))


def scene(*objects, texture="plain", seed=0):
    return Scene(tuple(objects), Texture(texture), seed)


def naive_matches(query: Query, s: Scene) -> bool:
    """Reference: try every injective assignment of constraints to objects."""
    if query.texture is not None and query.texture is not s.texture:
        return False
    for chosen in itertools.permutations(s.objects, len(query.objects)):
        if all(
            all(getattr(q, f) is None or getattr(q, f) is getattr(o, f)
                for f in ("shape", "colour", "size", "position"))
            for q, o in zip(query.objects, chosen)
        ):
            return True
    return False


def test_vocabularies_are_large_enough_and_words_unique():
    words = [m.value for e in (Shape, Colour, Size, Position, Texture) for m in e]
    assert len(Shape) >= 6 and len(Colour) >= 6
    assert len(words) == len(set(words))
    assert set(OUTLINES) == set(Shape) and set(COLOUR_RGB) == set(Colour)


def test_world_is_deterministic_and_seeds_differ():
    a, b = make_world(40, seed=3), make_world(40, seed=3)
    c = make_world(40, seed=4)
    assert a.scenes == b.scenes and a.captions == b.captions
    np.testing.assert_array_equal(a.images, b.images)
    assert a.scenes != c.scenes
    train = make_world(40, seed=3, part="train")
    assert train.scenes != a.scenes


def test_images_have_expected_shape_and_show_object_colour():
    s = scene(obj("square", "red", "large", "center"), seed=5)
    image = render_scene(s, 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[32, 32], COLOUR_RGB[Colour.RED])
    corner = image[2, 2]
    assert corner[0] == corner[1] == corner[2]  # grey background


def test_ring_shows_background_in_its_hole():
    image = render_scene(scene(obj("ring", "blue", "large", "center"), seed=1), 64)
    centre = image[32, 32]
    assert centre[0] == centre[1] == centre[2]
    disc = render_scene(scene(obj("circle", "blue", "large", "center"), seed=1), 64)
    np.testing.assert_array_equal(disc[32, 32], COLOUR_RGB[Colour.BLUE])


def test_two_object_scenes_occur_on_opposite_sides():
    world = make_world(300, seed=0)
    pairs = [tuple(o.position for o in s.objects) for s in world.scenes if len(s.objects) == 2]
    assert pairs, "expected some two-object scenes"
    opposite = {frozenset(p) for p in [("left", "right"), ("top", "bottom")]}
    assert all(frozenset(p.value for p in pair) in opposite for pair in pairs)


def test_captions_name_every_attribute_and_parse_back():
    world = make_world(200, seed=1)
    for s, text in zip(world.scenes, world.captions):
        assert parse_query(text) == full_query(s)
        for o in s.objects:
            for word in (o.shape.value, o.colour.value, o.size.value, o.position.value):
                assert word in text
        assert s.texture.value in text
    assert len({text.split(" ")[1] for text in world.captions}) > 1  # several templates


def test_canonical_caption():
    s = scene(obj("circle", "red", "large", "left"), obj("square", "blue", "small", "right"))
    assert caption(s) == (
        "a large red circle on the left and a small blue square on the right on a plain background"
    )


def test_parse_partial_and_two_object_queries():
    assert parse_query("a red circle") == Query((ObjectQuery(Shape.CIRCLE, Colour.RED),))
    q = parse_query("small blue square at the top and a green thing on a dotted background")
    assert q.texture is Texture.DOTTED
    assert q.objects == (
        ObjectQuery(Shape.SQUARE, Colour.BLUE, Size.SMALL, Position.TOP),
        ObjectQuery(colour=Colour.GREEN),
    )
    with pytest.raises(ValueError, match="two colours"):
        parse_query("a red blue circle")
    with pytest.raises(ValueError, match="names no"):
        parse_query("a dog on a beach")


def test_query_text_round_trips():
    queries = [
        Query((ObjectQuery(Shape.STAR),)),
        Query((ObjectQuery(colour=Colour.PINK, position=Position.BOTTOM),), Texture.STRIPED),
        Query((ObjectQuery(size=Size.SMALL), ObjectQuery(Shape.RING, Colour.CYAN))),
    ]
    for q in queries:
        assert parse_query(query_text(q)) == q


def test_relevance_hand_made_cases():
    red_left = scene(obj("circle", "red", "large", "left"), obj("square", "blue", "small", "right"),
                     texture="striped")
    lone = scene(obj("circle", "blue", "small", "center"))
    cases = {
        "a red circle": (True, False),
        "a circle": (True, True),
        "a blue circle": (False, True),
        "a large red circle on the left": (True, False),
        "a red circle on the right": (False, False),
        "a red circle and a blue square": (True, False),
        "a blue square and a red circle": (True, False),
        "a circle and a circle": (False, False),
        "a red circle on a striped background": (True, False),
        "a circle on a plain background": (False, True),
        "a small blue object": (True, True),
    }
    for text, expected in cases.items():
        got = tuple(bool(v) for v in relevance_matrix([text], [red_left, lone])[0])
        assert got == expected, text
    assert matches("a red circle", red_left) and not matches("a red circle", lone)


def test_relevance_matrix_agrees_with_naive_reference():
    world = make_world(150, seed=2)
    rng = np.random.default_rng(0)
    fields = ("shape", "colour", "size", "position")
    queries = [full_query(s) for s in world.scenes[:30]]
    for s in world.scenes[30:90]:
        keep = [f for f in fields if rng.random() < 0.5] or ["shape"]
        queries.append(partial_query(s, keep, include_texture=bool(rng.random() < 0.3)))
    queries.append(Query((ObjectQuery(), ObjectQuery())))  # any two-object scene
    got = relevance_matrix(queries, world.scenes)
    expected = np.array([[naive_matches(q, s) for s in world.scenes] for q in queries])
    np.testing.assert_array_equal(got, expected)
    assert got[np.arange(30), np.arange(30)].all()  # a caption matches its own image


def test_partial_query_validates_attributes():
    s = scene(obj("circle", "red"))
    with pytest.raises(ValueError, match="attributes must be among"):
        partial_query(s, ["hue"])
