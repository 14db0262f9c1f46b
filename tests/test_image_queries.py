"""Image queries and stored activations: a duplicate of an indexed image scores cosine 1, std 0.

Real image files, the tiny model from a fixed checkpoint and a random posterior; indexes
built with ``--store-activations`` (``activations.npy``) and without. docs/math.md section 12.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import random_posterior, save_tiny_checkpoint, write_images
from PIL import Image

from bayesretrieval.cli import main
from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.indexing import BuildConfig, IndexMismatchError, build_index, build_index_from_embeddings
from bayesretrieval.options import TINY_MODEL
from bayesretrieval.queries import Searcher
from bayesretrieval.queries.filters import ItemFilter
from bayesretrieval.similarity import shared_projection_cosine_moments
from bayesretrieval.store import IndexReader, Manifest

D, H = 64, 64
NAMES = [f"d{i % 2}/img {i}.png" for i in range(8)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images, checkpoint, encoder, posterior; one index with activations and one without."""
    root = tmp_path_factory.mktemp("world")
    checkpoint = save_tiny_checkpoint(root / "tiny.pt")
    encoder = ClipEncoder.from_pretrained(TINY_MODEL, checkpoint)
    posterior = random_posterior(D, H, model=encoder.identity)
    write_images(root / "src", NAMES)
    build_index(root / "src", root / "with", encoder, posterior, fast(store_activations=True))
    build_index(root / "src", root / "without", encoder, posterior, fast())
    return {"root": root, "src": root / "src", "with": root / "with", "without": root / "without",
            "checkpoint": checkpoint, "encoder": encoder, "posterior": posterior}


def fast(**kwargs) -> BuildConfig:
    return BuildConfig(**{"batch_size": 4, "workers": 0, **kwargs})


def copy_index(world, tmp_path, name="with") -> Path:
    return Path(shutil.copytree(world[name], tmp_path / name, ignore=shutil.ignore_patterns("readers")))


def activations_by_path(index: Path) -> dict:
    with IndexReader.open(index) as reader:
        return dict(zip(reader.paths(reader.item_ids), np.asarray(reader.activations)))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def rebuild_cli(capsys, src: Path, index: Path, *extra) -> str:
    """``build-index SRC INDEX`` with no model, posterior or activations option (the recorded ones)."""
    code, out, err = run_cli(capsys, "build-index", src, index, "--workers", "0", "--batch-size", "4",
                             "--no-progress", *extra)
    assert code == 0, err
    return out


# ---------------------------------------------------------------- storage


def test_stored_activations_are_the_encoders_and_give_the_stored_scale(world):
    with IndexReader.open(world["with"]) as reader:
        reader.verify()
        manifest = reader.manifest
        assert manifest.activation_dim == H and manifest.has_activations
        assert "activations.npy" in manifest.files and manifest.file_sizes["activations.npy"] > len(reader) * H * 4
        stored = np.array(reader.activations)
        assert stored.shape == (len(reader), H) and stored.dtype == np.float32
        paths = reader.paths(reader.item_ids)
        pixels = torch.stack([world["encoder"].preprocess(Image.open(world["src"] / p).convert("RGB"))
                              for p in paths])
        encoded = world["encoder"].encode_images(pixels)
        np.testing.assert_allclose(stored, encoded.activations.numpy(), rtol=1e-5, atol=1e-6)
        # the stored scale is a^T A^-1 a of exactly the stored activations
        scale = world["posterior"].image.activation_scale(torch.from_numpy(stored)).numpy()
        np.testing.assert_allclose(np.asarray(reader.scalars)[:, 0], scale, rtol=1e-12)
        table = reader.read_items(columns=["activation"])
        assert table.schema.field("activation").type == pa.list_(pa.float32(), H)
        np.testing.assert_array_equal(np.stack(table.column("activation").to_pylist()), stored)
        rows = reader.fetch(reader.item_ids[[3, 1]], activations=True)
        np.testing.assert_array_equal(rows.activations, stored[[3, 1]])
        assert reader.fetch(reader.item_ids[:2]).activations is None


def test_without_the_option_no_activations_are_stored(world):
    with IndexReader.open(world["without"]) as reader:
        assert reader.manifest.activation_dim == 0 and reader.activations is None
        assert "activations.npy" not in reader.manifest.files
        assert not (reader.version_dir / "activations.npy").exists()
        assert "activation" not in reader.read_items().column_names
        assert reader.fetch(reader.item_ids[:2], activations=True).activations is None


def test_manifests_written_before_activations_still_load(world):
    with IndexReader.open(world["without"]) as reader:
        data = reader.manifest.to_dict()
    del data["activation_dim"]
    assert Manifest.from_dict(data).activation_dim == 0
    with pytest.raises(ValueError, match="lacks fields"):
        Manifest.from_dict({k: v for k, v in data.items() if k != "embed_dim"})


def test_activations_survive_an_incremental_update(world, tmp_path, capsys):
    src = Path(shutil.copytree(world["src"], tmp_path / "src"))
    index = copy_index(world, tmp_path)
    write_images(src, ["d2/new.png"], seed=5)
    out = rebuild_cli(capsys, src, index)
    assert "processed 1 files" in out and "unchanged 8" in out, out
    build_index(src, tmp_path / "clean", world["encoder"], world["posterior"], fast(store_activations=True))
    got, want = activations_by_path(index), activations_by_path(tmp_path / "clean")
    assert sorted(got) == sorted(want) and len(got) == 9
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6)
    before = activations_by_path(world["with"])
    for path in before:  # kept rows are copied, not re-encoded
        np.testing.assert_array_equal(got[path], before[path])
    assert run_cli(capsys, "verify", index)[0] == 0


@pytest.mark.parametrize("damaged", ["means.npy", "activations.npy"])
def test_activations_survive_a_repair(world, tmp_path, capsys, damaged):
    index = copy_index(world, tmp_path)
    with IndexReader.open(index) as reader:
        target = reader.version_dir / damaged
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    code, _, err = run_cli(capsys, "verify", index)
    assert code != 0 and damaged in err
    out = rebuild_cli(capsys, world["src"], index)
    assert "processed 0 files" in out and "unchanged 8" in out, out
    assert run_cli(capsys, "verify", index)[0] == 0
    got, want = activations_by_path(index), activations_by_path(world["with"])
    assert sorted(got) == sorted(want)
    for path in want:
        np.testing.assert_array_equal(got[path], want[path])


def test_activations_survive_a_resumed_build(world, tmp_path):
    """A build killed after its first shard resumes from the shards, activations included."""
    index = tmp_path / "index"
    calls = []

    def die_after_first_shard(progress):
        calls.append(progress.done)
        if progress.done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(world["src"], index, world["encoder"], world["posterior"],
                    fast(store_activations=True, shard_batches=1), on_progress=die_after_first_shard)
    assert list((index / "work" / "shards").glob("shard-*.parquet"))
    report = build_index(world["src"], index, world["encoder"], world["posterior"], fast(store_activations=True))
    assert report.resumed == 4 and report.encoded == 4
    got, want = activations_by_path(index), activations_by_path(world["with"])
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6)


def test_changing_the_setting_is_a_mismatch_and_rerunning_keeps_it(world, tmp_path, capsys):
    index = copy_index(world, tmp_path)
    with pytest.raises(IndexMismatchError, match="activations: index stores them, command asks without them"):
        build_index(world["src"], index, world["encoder"], world["posterior"], fast())
    plain = copy_index(world, tmp_path, "without")
    with pytest.raises(IndexMismatchError, match="activations: index does not store them"):
        build_index(world["src"], plain, world["encoder"], world["posterior"], fast(store_activations=True))
    code, _, err = run_cli(capsys, "build-index", world["src"], plain, "--store-activations", "--workers", "0",
                           "--no-progress")
    assert code != 0 and "--rebuild" in err, err
    # re-running with no option keeps what each index records
    assert "nothing changed" in rebuild_cli(capsys, world["src"], index)
    assert "nothing changed" in rebuild_cli(capsys, world["src"], plain)
    # adding them takes --rebuild (every image encoded again)
    rebuild_cli(capsys, world["src"], plain, "--store-activations", "--rebuild", "--pretrained",
                world["checkpoint"], "--model", TINY_MODEL, "--posterior",
                IndexReader.open(world["without"]).version_dir / "posterior")
    with IndexReader.open(plain) as reader:
        assert reader.manifest.activation_dim == H


def test_precomputed_embeddings_store_their_activation_column(world, tmp_path):
    rng = np.random.default_rng(0)
    means, acts = rng.normal(size=(5, D)), rng.normal(size=(5, H))
    table = pa.table({"item_id": np.arange(5), "embedding": list(means), "activation": list(acts)})
    pq.write_table(table, tmp_path / "e.parquet")
    identity = world["encoder"].identity
    build_index_from_embeddings(tmp_path / "e.parquet", tmp_path / "idx", world["posterior"], identity,
                                BuildConfig(store_activations=True))
    with IndexReader.open(tmp_path / "idx") as reader:
        np.testing.assert_allclose(reader.activations, acts.astype(np.float32))
    pq.write_table(table.drop(["activation"]), tmp_path / "plain.parquet")
    with pytest.raises(ValueError, match="--store-activations needs an 'activation' column"):
        build_index_from_embeddings(tmp_path / "plain.parquet", tmp_path / "idx2", world["posterior"], identity,
                                    BuildConfig(store_activations=True))


def test_manifest_json_records_activation_dim(world):
    with IndexReader.open(world["with"]) as reader:
        assert json.loads((reader.version_dir / "manifest.json").read_text())["activation_dim"] == H


# ---------------------------------------------------------------- search


def query_image(world, name: str) -> Image.Image:
    with Image.open(world["src"] / name) as image:
        return image.convert("RGB")


def test_an_indexed_image_searched_for_itself_has_cosine_one_and_std_zero(world):
    name = NAMES[3]
    with Searcher.open(world["with"], encoder=world["encoder"]) as searcher:
        found = searcher.search(query_image(world, name), k=3)
        pixels = torch.stack([world["encoder"].preprocess(query_image(world, name))])
        from_pixels = searcher.search(pixels, k=3)
        filtered = searcher.search(query_image(world, name), k=3, where=ItemFilter(path_prefix="d1/"))
    assert filtered.path.str.startswith("d1/").all() and len(filtered) == 3
    for results in (found, from_pixels, filtered):
        top = results.iloc[0]
        assert top.path == name and top["rank"] == 1
        assert abs(top.cosine_mean - 1) < 1e-9 and top.cosine_std < 1e-6, (top.cosine_mean, top.cosine_std)
        assert results.attrs["shared_projection"] and not results.attrs["exact"] and not results.attrs["certified"]
        assert not results.exact.any()
        assert results.cosine_std_query.isna().all() and results.cosine_std_item.isna().all()
        assert (results.cosine_mean.iloc[1:] < 1 - 1e-3).all() and (results.cosine_std.iloc[1:] > 0).all()


def test_without_stored_activations_a_duplicate_is_scored_as_independent(world):
    """The old behaviour, kept for indexes built without --store-activations: E[cos] < 1, std > 0.

    Here (random noise images, a random tiny model) the duplicate is not even ranked first.
    """
    name = NAMES[3]
    with Searcher.open(world["without"], encoder=world["encoder"]) as searcher:
        results = searcher.search(query_image(world, name), k=len(NAMES))
    same = results[results.path == name].iloc[0]
    assert same.cosine_mean < 1 - 1e-3 and same.cosine_std > 1e-4, (same.cosine_mean, same.cosine_std)
    assert not results.attrs["shared_projection"] and results.attrs["exact"]
    assert results.cosine_std_query.notna().all() and results.cosine_std_item.notna().all()


@pytest.mark.parametrize("score", ["expected", "lcb"])
def test_returned_moments_are_the_shared_projection_moments(world, score):
    """Every returned pair's moments equal the formula applied directly; the order is the brute-force one."""
    names = [NAMES[0], NAMES[5]]
    images = [query_image(world, n) for n in names]
    with Searcher.open(world["with"], encoder=world["encoder"]) as searcher:
        results = searcher.search(images, k=len(NAMES), score=score, kappa=2.0)
        reader = searcher.reader
        rows = reader.fetch(reader.item_ids, activations=True)
        encoded = world["encoder"].encode_images(torch.stack([world["encoder"].preprocess(i) for i in images]))
        mean, var = shared_projection_cosine_moments(torch.from_numpy(rows.means), torch.from_numpy(rows.activations),
                                                     encoded.embeds, encoded.activations, world["posterior"].image)
        ids = np.asarray(reader.item_ids)
    for q in range(len(names)):
        got = results[results.query_index == q]
        want_score = mean[:, q] - (2.0 * var[:, q].sqrt() if score == "lcb" else 0)
        order = np.lexsort((ids, -want_score.numpy()))
        np.testing.assert_array_equal(got.item_id, ids[order])
        np.testing.assert_allclose(got.cosine_mean, mean[order, q].numpy(), rtol=0, atol=1e-7)
        np.testing.assert_allclose(got.cosine_std, var[order, q].sqrt().numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(got.score, want_score[order].numpy(), rtol=0, atol=1e-6)
        assert got.iloc[0].path == names[q]


def test_text_queries_are_unchanged_by_stored_activations(world):
    with Searcher.open(world["with"], encoder=world["encoder"]) as searcher:
        got = searcher.search(["a red square", "noise"], k=5)
    with Searcher.open(world["without"], encoder=world["encoder"]) as searcher:
        want = searcher.search(["a red square", "noise"], k=5)
    pd.testing.assert_frame_equal(got, want)
    assert not got.attrs["shared_projection"] and got.attrs["exact"]


def test_the_cli_shows_std_zero_for_a_duplicate(world, capsys):
    code, out, err = run_cli(capsys, "search", world["with"], "--image", world["src"] / NAMES[2], "-k", "2",
                             "--format", "json")
    assert code == 0, err
    rows = json.loads(out)["results"]
    assert rows[0]["path"] == NAMES[2] and abs(rows[0]["cosine_mean"] - 1) < 1e-9 and rows[0]["cosine_std"] < 1e-6
    code, out, err = run_cli(capsys, "search", world["with"], "--image", world["src"] / NAMES[2], "-k", "2")
    assert code == 0, err
    first = next(line for line in out.splitlines() if line.rstrip().endswith(f"{NAMES[2]}  False"))
    assert "1.000 ± 0.000" in first and " - " in first, out
    assert "image queries rescored for the projection both images share" in err, err
