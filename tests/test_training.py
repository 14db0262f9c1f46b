"""Training the small CLIP, its checkpoints and cache, and the recall floor."""

import argparse
import dataclasses

import open_clip
import pytest
import torch

from bayesretrieval import training
from bayesretrieval.cache import CACHE_ENV
from bayesretrieval.commands import train_clip as train_clip_command
from bayesretrieval.encoders import ClipEncoder, register_model_configs
from bayesretrieval.options import TINY_MODEL
from bayesretrieval.training import (
    ModelSize,
    TrainConfig,
    get_trained_model,
    model_name,
    read_checkpoint_metadata,
    save_checkpoint,
    train_clip,
)
from bayesretrieval.world import make_world, world_recall

QUICK = TrainConfig(TINY_MODEL, steps=3, batch_size=8, warmup_steps=1)


@pytest.fixture()
def quick_cache(tmp_path, monkeypatch):
    """An empty model cache and a three-step 'test' config."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setitem(training.TRAIN_CONFIGS, ModelSize.TEST, QUICK)
    return tmp_path / "cache" / "models"


@pytest.fixture(scope="session")
def test_checkpoint():
    """The real test-size model (trained once per machine, about 40 s, then cached)."""
    return get_trained_model(ModelSize.TEST, seed=0)


def test_training_is_reproducible_from_its_seed():
    steps = []
    a = train_clip(QUICK, seed=1, progress=steps.append)
    b = train_clip(QUICK, seed=1)
    c = train_clip(QUICK, seed=2)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.visual.proj, c.visual.proj)
    assert [s.step for s in steps] == [1, 2, 3]
    assert all(s.loss > 0 and s.images_per_s > 0 for s in steps)


def test_checkpoint_round_trips_through_open_clip_loader(tmp_path):
    model = train_clip(QUICK, seed=0)
    path = save_checkpoint(model, tmp_path / "m.pt", {"seed": 0})
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left
    register_model_configs()
    loaded, _, _ = open_clip.create_model_and_transforms(TINY_MODEL, pretrained=str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert read_checkpoint_metadata(path) == {"seed": 0}
    encoder = ClipEncoder.from_pretrained(TINY_MODEL, path)
    assert encoder.identity.checkpoint_sha256 is not None


def test_killed_save_leaves_no_cache_entry(tmp_path, monkeypatch):
    def dying_save(obj, handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(training.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_get_trained_model_trains_once_then_uses_the_cache(quick_cache):
    calls = []
    path = get_trained_model("test", seed=0, progress=calls.append)
    assert path.parent == quick_cache and path.is_file() and len(calls) == 3
    assert f"seed0-{QUICK.fingerprint()}" in path.name
    mtime = path.stat().st_mtime_ns
    assert get_trained_model("test", seed=0, progress=calls.append) == path
    assert len(calls) == 3 and path.stat().st_mtime_ns == mtime
    metadata = read_checkpoint_metadata(path)
    assert metadata["train_config"] == QUICK.to_dict() and metadata["seed"] == 0
    assert get_trained_model("test", seed=1) != path


def test_config_fingerprint_tracks_hyper_parameters():
    same = TrainConfig(TINY_MODEL, steps=3, batch_size=8, warmup_steps=1)
    assert QUICK.fingerprint() == same.fingerprint()
    assert QUICK.fingerprint() != dataclasses.replace(QUICK, lr=2e-3).fingerprint()
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(TINY_MODEL, steps=3, warmup_steps=5)


def test_train_clip_command_prints_model_and_checkpoint(quick_cache, capsys):
    parser = argparse.ArgumentParser()
    train_clip_command.register(parser.add_subparsers())
    args = parser.parse_args(["train-clip", "--size", "test", "--seed", "4"])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert f"model: {TINY_MODEL}" in out
    assert str(quick_cache) in out and "seed4" in out


def test_test_model_recall_above_floor(test_checkpoint):
    encoder = ClipEncoder.from_pretrained(model_name("test"), test_checkpoint)
    clean = world_recall(encoder, make_world(1000, seed=0))
    assert clean[10] >= 0.6 and clean[1] >= 0.15
    noisy = world_recall(encoder, make_world(1000, seed=0, shift="noise", severity=5))
    assert noisy[10] < clean[10] - 0.2


@pytest.mark.slow
def test_benchmark_model_recall_above_floor():
    path = get_trained_model(ModelSize.BENCHMARK, seed=0)
    encoder = ClipEncoder.from_pretrained(model_name("benchmark"), path)
    recall = world_recall(encoder, make_world(1000, seed=0))
    assert recall[10] >= 0.6
