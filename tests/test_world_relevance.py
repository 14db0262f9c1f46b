"""Visible-attribute relevance: a shifted image matches only what it still shows (hand-made cases)."""

import numpy as np
import pytest

from bayesretrieval.options import MAX_SEVERITY, Shift
from bayesretrieval.world.captions import ObjectQuery, Query, full_query
from bayesretrieval.world.relevance import (
    UNRECOGNISABLE_FROM,
    VISIBLE_ATTRIBUTES,
    hidden_attributes,
    named_attributes,
    relevance_matrix,
    visible_relevance_matrix,
)
from bayesretrieval.world.scenes import Scene, WorldObject
from bayesretrieval.world.vocab import Colour, Position, Shape, Size, Texture

RED_CIRCLE = Scene((WorldObject(Shape.CIRCLE, Colour.RED, Size.LARGE, Position.LEFT),), Texture.STRIPED, seed=0)
COLOUR = Query((ObjectQuery(colour=Colour.RED),))
SHAPE = Query((ObjectQuery(shape=Shape.CIRCLE),))
PLACE = Query((ObjectQuery(size=Size.LARGE, position=Position.LEFT),))
STRIPES = Query((), Texture.STRIPED)
QUERIES = [COLOUR, SHAPE, PLACE, STRIPES, full_query(RED_CIRCLE)]


def labels(shift, severity):
    return visible_relevance_matrix(QUERIES, [RED_CIRCLE], [shift], [severity])[:, 0].tolist()


def test_clean_and_content_shifts_keep_the_scene_labels():
    assert relevance_matrix(QUERIES, [RED_CIRCLE])[:, 0].all()
    assert labels(None, None) == [True] * 5
    for shift in (Shift.COMBINATION, Shift.NOVEL_SHAPE):
        assert labels(shift, MAX_SEVERITY) == [True] * 5


@pytest.mark.parametrize("shift, severity, expected", [
    # colour, shape, size+position, texture, full description
    (Shift.BLUR, 3, [True, True, True, True, True]),
    (Shift.BLUR, 4, [True, False, True, False, False]),  # a blob: colour and place, no outline
    (Shift.CONTRAST, 3, [True, True, True, True, True]),
    (Shift.CONTRAST, 4, [False, True, True, False, False]),  # colourless but still a shape
    (Shift.CONTRAST, 5, [False, False, True, False, False]),
    (Shift.NOISE, 4, [True, True, True, False, False]),
    (Shift.NOISE, 5, [False, False, True, False, False]),
    (Shift.OCCLUSION, 4, [True, False, False, True, False]),
    (Shift.OCCLUSION, 5, [False, False, False, True, False]),
    (Shift.JPEG, 5, [False, True, True, False, False]),
])
def test_hidden_attributes_remove_only_queries_that_name_them(shift, severity, expected):
    assert labels(shift, severity) == expected


def test_a_scene_mismatch_stays_irrelevant_whatever_the_shift():
    blue = Query((ObjectQuery(colour=Colour.BLUE),))
    assert not visible_relevance_matrix([blue], [RED_CIRCLE], [None], [None]).any()
    assert not visible_relevance_matrix([blue], [RED_CIRCLE], [Shift.BLUR], [5]).any()


def test_table_is_monotone_in_severity_and_names_known_attributes():
    assert set(UNRECOGNISABLE_FROM) == set(Shift)
    for shift in Shift:
        assert set(UNRECOGNISABLE_FROM[shift]) <= set(VISIBLE_ATTRIBUTES)
        hidden = [hidden_attributes(shift, s) for s in range(1, MAX_SEVERITY + 1)]
        assert all(a <= b for a, b in zip(hidden, hidden[1:]))
        assert not hidden[0]  # severity 1 hides nothing
    assert hidden_attributes(None, None) == frozenset()


def test_named_attributes_and_validation():
    assert named_attributes(full_query(RED_CIRCLE)) == frozenset(VISIBLE_ATTRIBUTES)
    assert named_attributes("a red thing") == {"colour"}
    with pytest.raises(ValueError, match="severity must be in"):
        hidden_attributes(Shift.BLUR, 0)
    with pytest.raises(ValueError, match="1 scenes, 2 shifts"):
        visible_relevance_matrix(QUERIES, [RED_CIRCLE], [None, None], [None])


def test_mixed_gallery_columns_follow_their_own_shift():
    scenes = [RED_CIRCLE] * 3
    got = visible_relevance_matrix([SHAPE, COLOUR], scenes, [None, "blur", "contrast"], [None, 5, 5])
    np.testing.assert_array_equal(got, [[True, False, False], [True, True, False]])
