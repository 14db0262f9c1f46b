"""Splits, shift families and severities."""

import numpy as np
import pytest

from bayesretrieval.world import (
    DEFAULT_SPLIT,
    Colour,
    Shape,
    Shift,
    WorldSplit,
    corrupt,
    iter_batches,
    make_split,
    make_world,
)


def object_pairs(scenes):
    return {(o.shape, o.colour) for s in scenes for o in s.objects}


def test_default_split_holds_out_a_shape_and_pairs_covering_all_colours():
    split = DEFAULT_SPLIT
    assert split.held_out_shapes == (Shape.STAR,)
    assert len(split.held_out_pairs) == 8
    assert {c for _, c in split.held_out_pairs} == set(Colour)
    train_pairs = set(split.train_pool().pairs)
    assert not train_pairs & set(split.held_out_pairs)
    assert {s for s, _ in train_pairs} == set(Shape) - {Shape.STAR}
    assert {c for _, c in train_pairs} == set(Colour)
    assert WorldSplit.from_dict(split.to_dict()) == split


def test_make_split_validates():
    assert make_split(seed=1) != make_split(seed=2)
    with pytest.raises(ValueError, match="n_held_out_pairs"):
        make_split(n_held_out_pairs=9)
    with pytest.raises(ValueError, match="training shapes"):
        WorldSplit((Shape.STAR,), ((Shape.STAR, Colour.RED),))


def test_training_and_clean_test_worlds_never_show_held_out_content():
    train = make_world(600, seed=0, part="train")
    test = make_world(600, seed=0)
    held_out = set(DEFAULT_SPLIT.held_out_pairs)
    for world in (train, test):
        pairs = object_pairs(world.scenes)
        assert not pairs & held_out
        assert Shape.STAR not in {s for s, _ in pairs}
        assert not world.shifted.any()
    images, captions = next(iter_batches(300, seed=0))
    assert images.shape == (300, 64, 64, 3) and len(captions) == 300
    assert "star" not in " ".join(captions)


@pytest.mark.parametrize("shift", ["combination", "novel_shape"])
def test_held_out_shifts_replace_a_nested_growing_fraction(shift):
    clean = make_world(200, seed=0)
    previous = np.zeros(200, dtype=bool)
    for severity in range(1, 6):
        world = make_world(200, seed=0, shift=shift, severity=severity)
        assert world.shifted.sum() == round(200 * severity / 5)
        assert (world.shifted >= previous).all()  # severities nest
        previous = world.shifted
        for i, s in enumerate(world.scenes):
            pairs = object_pairs([s])
            if shift == "combination":
                unseen = bool(pairs & set(DEFAULT_SPLIT.held_out_pairs))
            else:
                unseen = Shape.STAR in {p[0] for p in pairs}
            assert unseen == world.shifted[i]
            if not world.shifted[i]:
                assert s == clean.scenes[i]
                np.testing.assert_array_equal(world.images[i], clean.images[i])


@pytest.mark.parametrize("shift", [s for s in Shift if s.is_pixel])
def test_pixel_shifts_corrupt_the_clean_scenes_more_with_severity(shift):
    clean = make_world(24, seed=0)
    errors = []
    for severity in (1, 3, 5):
        world = make_world(24, seed=0, shift=shift, severity=severity)
        assert world.scenes == clean.scenes and world.captions == clean.captions
        assert world.shifted.all() and world.images.dtype == np.uint8
        diff = world.images.astype(float) - clean.images.astype(float)
        errors.append(float(np.abs(diff).mean()))
    assert errors[0] > 0
    assert errors[0] < errors[2]


def test_shift_arguments_are_validated():
    with pytest.raises(ValueError, match="severity must be an integer in"):
        make_world(5, shift="noise", severity=6)
    with pytest.raises(ValueError, match="severity 0"):
        make_world(5, severity=2)
    with pytest.raises(ValueError, match="test worlds"):
        make_world(5, part="train", shift="blur", severity=1)
    with pytest.raises(ValueError):
        make_world(5, shift="fog", severity=1)
    images = make_world(2, seed=0).images
    with pytest.raises(ValueError, match="not a pixel corruption"):
        corrupt(images, "combination", 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        corrupt(images.astype(float), "noise", 1, np.random.default_rng(0))
