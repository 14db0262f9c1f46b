"""Writing worlds to disk, the make-world command, model input and recall."""

import argparse
import json

import numpy as np
import open_clip
import pandas as pd
import pytest
from PIL import Image

from bayesretrieval.commands import make_world as make_world_command
from bayesretrieval.encoders import register_model_configs
from bayesretrieval.options import TINY_MODEL
from bayesretrieval.world import images_to_tensor, make_world, read_world, recall_at_ks, write_world
from bayesretrieval.world.io import read_world_table


def test_png_world_round_trips_exactly(tmp_path):
    world = make_world(30, seed=0, shift="combination", severity=2)
    write_world(world, tmp_path / "w")
    back = read_world(tmp_path / "w")
    np.testing.assert_array_equal(back.images, world.images)
    assert back.scenes == world.scenes and back.captions == world.captions
    np.testing.assert_array_equal(back.shifted, world.shifted)
    assert (back.shift, back.severity, back.split) == (world.shift, world.severity, world.split)
    frame, manifest = read_world_table(tmp_path / "w")
    assert manifest["n_items"] == 30 and manifest["shift"] == "combination"
    assert frame["item_id"].tolist() == list(range(30))
    assert (tmp_path / "w" / "images" / frame["path"][0]).is_file()


def test_jpeg_world_and_overwrite_guard(tmp_path):
    world = make_world(5, seed=1)
    write_world(world, tmp_path, image_format="jpeg")
    files = sorted((tmp_path / "images").rglob("*.jpg"))
    assert len(files) == 5
    back = read_world(tmp_path)
    assert np.abs(back.images.astype(int) - world.images.astype(int)).mean() < 6
    with pytest.raises(FileExistsError):
        write_world(world, tmp_path)
    write_world(world, tmp_path, overwrite=True)


def test_parquet_metadata_carries_the_manifest(tmp_path):
    write_world(make_world(3, seed=0), tmp_path)
    import pyarrow.parquet as pq

    meta = pq.read_schema(tmp_path / "world.parquet").metadata
    assert json.loads(meta[b"bayesretrieval.world"])["n_items"] == 3
    frame = pd.read_parquet(tmp_path / "world.parquet")
    assert {"item_id", "path", "caption", "obj0_shape", "obj1_colour", "texture"} <= set(frame)


def test_make_world_command_writes_a_world(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    make_world_command.register(parser.add_subparsers())
    out = tmp_path / "noisy"
    argv = ["make-world", str(out), "-n", "12", "--shift", "noise", "--severity", "2"]
    args = parser.parse_args(argv)
    assert args.run(args) == 0
    frame, manifest = read_world_table(out)
    assert len(frame) == 12 and manifest["shift"] == "noise" and manifest["severity"] == 2
    assert "wrote 12 images" in capsys.readouterr().out
    assert len(list((out / "images").rglob("*.png"))) == 12


def test_images_to_tensor_matches_open_clip_preprocess():
    register_model_configs()
    _, _, preprocess = open_clip.create_model_and_transforms(TINY_MODEL)
    images = make_world(4, seed=0, shift="noise", severity=3).images
    expected = np.stack([preprocess(Image.fromarray(im)).numpy() for im in images])
    np.testing.assert_allclose(images_to_tensor(images).numpy(), expected, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        images_to_tensor(images[0])


def test_recall_at_ks_hand_made():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    relevant = np.array([[False, False, True], [False, False, True]])
    assert recall_at_ks(scores, relevant, (1, 2, 3)) == {1: 0.0, 2: 0.5, 3: 1.0}
    nothing = np.array([[True, False, False], [False, False, False]])
    assert recall_at_ks(np.zeros((2, 3)), nothing, (1, 4)) == {1: 0.5, 4: 0.5}  # no relevant item: a miss
    with pytest.raises(ValueError, match="must both be"):
        recall_at_ks(np.zeros((1, 3)), np.ones((1, 2), dtype=bool), (1,))


def test_make_world_command_refuses_to_overwrite(tmp_path):
    from bayesretrieval.cli import CommandError

    parser = argparse.ArgumentParser()
    make_world_command.register(parser.add_subparsers())
    args = parser.parse_args(["make-world", str(tmp_path), "-n", "2"])
    assert args.run(args) == 0
    with pytest.raises(CommandError, match="--overwrite"):
        args.run(args)
    args = parser.parse_args(["make-world", str(tmp_path), "-n", "3", "--overwrite"])
    assert args.run(args) == 0
    assert len(read_world_table(tmp_path)[0]) == 3
    assert len(list((tmp_path / "images").rglob("*.png"))) == 3
    args = parser.parse_args(["make-world", str(tmp_path), "-n", "2", "--overwrite"])
    assert args.run(args) == 0
    assert len(list((tmp_path / "images").rglob("*.png"))) == 2
