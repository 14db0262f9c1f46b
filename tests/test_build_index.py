"""build-index end to end on real files with the tiny model: values, updates, mismatches."""

import argparse
import os
from dataclasses import replace

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_bad_corpus, random_posterior, write_images
from PIL import Image

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.indexing import BuildConfig, IndexMismatchError, build_index, decode_image
from bayesretrieval.options import TINY_MODEL
from bayesretrieval.similarity import side_statistics
from bayesretrieval.store import FORMAT_VERSION, SCALAR_COLUMNS, IndexReader

D = 64


def fast(**kwargs) -> BuildConfig:
    return BuildConfig(**{"batch_size": 4, "workers": 0, **kwargs})


def by_path(reader: IndexReader) -> dict:
    fetched, scalars = reader.fetch(reader.item_ids), np.asarray(reader.scalars)
    return {p: (int(i), fetched.means[k], scalars[k])
            for k, (p, i) in enumerate(zip(reader.paths(reader.item_ids), fetched.item_ids))}


def test_index_values_match_independent_computation(tmp_path, encoder, posterior):
    names = [f"d{i % 3}/img {i}.png" for i in range(9)]
    write_images(tmp_path / "img", names)
    (tmp_path / "img" / "broken.jpg").write_bytes(b"nope")
    report = build_index(tmp_path / "img", tmp_path / "idx", encoder, posterior, fast(workers=1))
    assert report.indexed == 9 and report.skipped == {"not_an_image": 1} and report.encoded == 10
    reader = IndexReader.open(tmp_path / "idx")
    reader.verify()
    rows = reader.read_items().to_pylist()
    assert [r["path"] for r in sorted(rows, key=lambda r: r["path"])] == sorted(names)
    # Ids follow path order; the skipped "broken.jpg" (first in order) used id 0.
    assert [r["item_id"] for r in rows] == list(range(1, 10)) and reader.manifest.next_item_id == 10
    pixels = torch.stack([encoder.preprocess(decode_image(tmp_path / "img" / r["path"])) for r in rows])
    enc = encoder.encode_images(pixels)
    np.testing.assert_allclose(np.stack([r["embedding"] for r in rows]), enc.embeds.numpy(), rtol=1e-5, atol=1e-6)
    sigma_i, sigma_t = posterior.image.output_cov, posterior.text.output_cov
    q = posterior.image.activation_scale(enc.activations.double())
    ref = side_statistics(enc.embeds.double(), q, sigma_i, sigma_t)
    ref_diag = side_statistics(enc.embeds.double(), q, torch.diag(sigma_i.diagonal()), torch.diag(sigma_t.diagonal()))
    want = torch.stack([ref.scale, ref.norm_sq, ref.own_quad, ref.other_quad,
                        ref_diag.own_quad, ref_diag.other_quad], 1)
    got = np.stack([[r[c] for c in SCALAR_COLUMNS] for r in rows])
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4)
    with Image.open(tmp_path / "img" / rows[0]["path"]) as first:
        assert (rows[0]["width"], rows[0]["height"]) == first.size
    # FAISS raw top-k == brute-force ranking by expected cosine to a query.
    query = np.random.default_rng(3).normal(size=(1, D)).astype(np.float32)
    _, ids = faiss.read_index(str(reader.version_dir / "index.faiss")).search(query, 9)
    expected_norm = np.sqrt(want[:, 1].numpy() + want[:, 0].numpy() * float(sigma_i.trace()))
    order = np.argsort(-(enc.embeds.numpy() @ query[0]) / expected_norm)
    np.testing.assert_array_equal(ids[0], np.array([r["item_id"] for r in rows])[order])


def test_incremental_update_keeps_ids_and_reencodes_only_changes(tmp_path, encoder, posterior):
    img = tmp_path / "img"
    write_images(img, [f"a{i}.png" for i in range(6)])
    first = build_index(img, tmp_path / "idx", encoder, posterior, fast())
    before = by_path(IndexReader.open(tmp_path / "idx"))
    old_reader = IndexReader.open(tmp_path / "idx")
    write_images(img, ["new/b0.png", "new/b1.png"], seed=5)
    write_images(img, ["a2.png"], seed=9)
    os.utime(img / "a2.png", ns=(1, 1))
    (img / "a4.png").unlink()
    report = build_index(img, tmp_path / "idx", encoder, posterior, fast())
    assert (report.encoded, report.reused, report.removed, report.indexed) == (3, 4, 1, 7)
    after = by_path(IndexReader.open(tmp_path / "idx"))
    for path in ("a0.png", "a1.png", "a3.png", "a5.png"):
        assert after[path][0] == before[path][0]
        np.testing.assert_array_equal(after[path][1], before[path][1])
    assert after["a2.png"][0] == before["a2.png"][0]
    assert not np.allclose(after["a2.png"][1], before["a2.png"][1])
    assert "a4.png" not in after
    assert sorted(after[p][0] for p in ("new/b0.png", "new/b1.png")) == [6, 7]
    assert first.manifest.next_item_id == 6 and report.manifest.next_item_id == 8
    # A reader opened before the update still reads its own version consistently.
    assert len(old_reader) == 6 and old_reader.paths([before["a4.png"][0]]) == ["a4.png"]
    assert old_reader.read_items(columns=["path"]).num_rows == 6
    # A clean build over the final folder gives the same embeddings.
    build_index(img, tmp_path / "clean", encoder, posterior, fast())
    clean = by_path(IndexReader.open(tmp_path / "clean"))
    assert sorted(clean) == sorted(after)
    for path in clean:
        np.testing.assert_allclose(clean[path][1], after[path][1], rtol=1e-5, atol=1e-6)
    again = build_index(img, tmp_path / "idx", encoder, posterior, fast())
    assert not again.published and again.manifest.version == report.manifest.version


def test_mismatches_name_both_sides_unless_rebuild(tmp_path, encoder, posterior, checkpoint):
    img = tmp_path / "img"
    write_images(img, ["x.png", "y.png"])
    build_index(img, tmp_path / "idx", encoder, posterior, fast())
    ids = {p: v[0] for p, v in by_path(IndexReader.open(tmp_path / "idx")).items()}
    other = random_posterior(D, 64, seed=7, model=encoder.identity)
    other.source = "other-posterior"
    with pytest.raises(IndexMismatchError,
                       match=r"posterior: index has random-test \(\w+\), command uses other-posterior"):
        build_index(img, tmp_path / "idx", encoder, other, fast())
    with pytest.raises(IndexMismatchError, match="variance columns: index has kfac, command asks for diag"):
        build_index(img, tmp_path / "idx", encoder, posterior, fast(variance="diag"))
    random_weights = ClipEncoder.from_pretrained(TINY_MODEL, None)
    with pytest.raises(IndexMismatchError,
                       match=rf"model: index has bayes-tiny/{checkpoint} \(sha256 \w+\), command uses bayes-tiny/None"):
        build_index(img, tmp_path / "idx", random_weights, replace(posterior, model=random_weights.identity), fast())
    report = build_index(img, tmp_path / "idx", encoder, other, fast(rebuild=True))
    assert report.encoded == 2 and report.manifest.posterior["source"] == "other-posterior"
    assert {p: v[0] for p, v in by_path(IndexReader.open(tmp_path / "idx")).items()} == ids
    manifest = tmp_path / "idx" / "manifest.json"
    manifest.write_text(manifest.read_text().replace(f'"format_version": {FORMAT_VERSION}', '"format_version": 1'))
    with pytest.raises(IndexMismatchError, match=r"index format version 1, this library reads version 2 \(and 3 "
                                                 r"with a last-block posterior\); rebuild"):
        build_index(img, tmp_path / "idx", encoder, other, fast())
    assert build_index(img, tmp_path / "idx", encoder, other, fast(rebuild=True)).manifest.format_version == 2


@pytest.mark.parametrize("rank", [3, D])
def test_variance_columns_restate_the_kronecker_covariance(tmp_path, encoder, posterior, rank):
    img = tmp_path / "img"
    write_images(img, ["p.png", "q.png", "r.png"])
    build_index(img, tmp_path / "diag", encoder, posterior, fast(variance="diag"))
    build_index(img, tmp_path / "low", encoder, posterior, fast(variance=f"lowrank:{rank}"))
    diag, low = IndexReader.open(tmp_path / "diag"), IndexReader.open(tmp_path / "low")
    sigma = posterior.image.output_cov.numpy()
    q = diag.fetch_scalars(diag.item_ids).scale
    np.testing.assert_allclose(diag.fetch(diag.item_ids).variance_diag, q[:, None] * np.diag(sigma)[None], rtol=1e-5)
    fetched = low.fetch(low.item_ids)
    for k in range(len(q)):
        factor = fetched.variance_lowrank[k].astype(np.float64)
        cov = factor.T @ factor + np.diag(fetched.variance_diag[k])
        np.testing.assert_allclose(np.diag(cov), q[k] * np.diag(sigma), rtol=1e-4)
        if rank == D:
            np.testing.assert_allclose(cov, q[k] * sigma, rtol=1e-3, atol=1e-6 * q[k])
    assert pq.read_schema(low.version_dir / "items.parquet").field("variance_lowrank").type.list_size == rank * D


def test_bad_file_corpus_end_to_end(tmp_path, encoder, posterior, monkeypatch):
    from bayesretrieval.indexing import decode as decode_module
    from bayesretrieval.skips import SkipReason

    img = tmp_path / "img"
    expected = make_bad_corpus(img)
    (img / "locked.jpg").write_bytes((img / "plain.jpg").read_bytes())
    expected["locked.jpg"] = SkipReason.UNREADABLE
    real_open = open

    def guarded_open(file, *args, **kwargs):  # root ignores chmod 000: simulate EACCES
        if str(file).endswith("locked.jpg"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(decode_module, "open", guarded_open, raising=False)
    report = build_index(img, tmp_path / "idx", encoder, posterior, fast(max_pixels=50_000_000))
    reader = IndexReader.open(tmp_path / "idx")
    skipped = {r["path"]: r["reason"] for r in reader.read_skipped().to_pylist()}
    indexed = {r["path"]: (r["width"], r["height"])
               for r in reader.read_items(columns=["path", "width", "height"]).to_pylist()}
    for name, outcome in expected.items():
        if isinstance(outcome, SkipReason):
            assert skipped.get(name) == outcome.value, name
        else:
            assert indexed.get(name) == outcome[:2], name
    assert set(skipped) | set(indexed) == set(expected)
    assert sum(report.skipped.values()) == len(skipped) and np.isfinite(reader.scalars).all()
    # Permissions fixed (no change to size or mtime): the update retries and indexes it;
    # content-determined skips are not retried.
    monkeypatch.undo()
    update = build_index(img, tmp_path / "idx", encoder, posterior, fast(max_pixels=50_000_000))
    assert (update.encoded == 2
            and "locked.jpg" in IndexReader.open(tmp_path / "idx").read_items(["path"]).column(0).to_pylist())
    assert update.skipped == {k: v for k, v in report.skipped.items() if k != "unreadable"}


def test_command_prints_summary(tmp_path, checkpoint, posterior, capsys):
    from bayesretrieval.commands import build_index as command

    write_images(tmp_path / "img", ["one.png", "two.jpg"])
    (tmp_path / "img" / "empty.png").write_bytes(b"")
    posterior.save(tmp_path / "posterior")
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    argv = ["build-index", str(tmp_path / "img"), str(tmp_path / "idx"), "--model", TINY_MODEL,
            "--pretrained", str(checkpoint), "--posterior", str(tmp_path / "posterior"), "--workers", "0",
            "--no-progress", "--faiss", "Flat"]
    args = parser.parse_args(argv)
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "index v000001: 2 items" in out and "skipped 1 (empty_file 1)" in out and "files/s processed" in out
    args = parser.parse_args(argv)
    assert args.run(args) == 0
    assert "nothing changed" in capsys.readouterr().out


def test_command_offline_bayesvlm_fails_at_once_saying_where(tmp_path, monkeypatch):
    from bayesretrieval.commands import build_index as command
    from bayesretrieval.posterior.hub import PosteriorUnavailableError

    monkeypatch.setenv("BAYESRETRIEVAL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BAYESRETRIEVAL_OFFLINE", "1")
    (tmp_path / "img").mkdir()
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["build-index", str(tmp_path / "img"), str(tmp_path / "idx")])
    with pytest.raises(PosteriorUnavailableError, match=r"into .*cache/posteriors/bayesvlm/hessian_CLIP-ViT-B-32"):
        args.run(args)
    assert not (tmp_path / "idx").exists()


def test_console_script_exit_codes_and_export(tmp_path, checkpoint, posterior, capsys):
    from bayesretrieval.cli import main

    write_images(tmp_path / "img", ["one.png", "two.png", "three.png"])
    posterior.save(tmp_path / "posterior")
    other = random_posterior(D, 64, seed=3, model=posterior.model)
    other.save(tmp_path / "other")
    common = ["--model", TINY_MODEL, "--pretrained", str(checkpoint), "--workers", "0", "--no-progress"]
    argv = ["build-index", str(tmp_path / "img"), str(tmp_path / "idx"), *common]
    assert main([*argv, "--posterior", str(tmp_path / "posterior")]) == 0
    assert main([*argv, "--posterior", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "build-index: error: existing index at version v000001 does not match: posterior: index has" in err
    assert main([*argv, "--posterior", str(tmp_path / "other"), "--rebuild"]) == 0
    assert main(["export", str(tmp_path / "idx"), str(tmp_path / "out")]) == 0
    assert np.load(tmp_path / "out" / "img_emb" / "img_emb_0.npy").shape == (3, D)
    assert pq.read_table(tmp_path / "out" / "metadata" / "metadata_0.parquet").column("image_path").to_pylist() == [
        "one.png", "three.png", "two.png"]


def test_user_factory_is_kept_across_updates(tmp_path, encoder, posterior):
    img = tmp_path / "img"
    write_images(img, ["a.png", "b.png", "c.png"])
    build_index(img, tmp_path / "idx", encoder, posterior, fast(faiss_factory="HNSW8"))
    write_images(img, ["d.png"], seed=4)
    report = build_index(img, tmp_path / "idx", encoder, posterior, fast())
    assert report.manifest.faiss_factory == "HNSW8"
    assert IndexReader.open(tmp_path / "idx").faiss_index.ntotal == 4
    with pytest.raises(ValueError, match="FAISS factory string 'Nope' is not valid for dim 64"):
        build_index(img, tmp_path / "idx", encoder, posterior, fast(faiss_factory="Nope"))
