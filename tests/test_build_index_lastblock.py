"""build-index --lastblock: per-item covariance from the last-block posterior, end to end from the command line.

The posteriors are fitted by ``fit-posterior`` on a written world, the index is built from
its image files, and what the index stores is compared with
:func:`~bayesretrieval.posterior.lastblock_posterior.item_covariance` on the same files; the
search over the stored ``diag`` covariances with a dense per-pair reference.
"""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import save_tiny_checkpoint
from PIL import Image
from reference import brute_force_top_k, second_order_item_variance, second_order_pair

from bayesretrieval import cli
from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.indexing import BuildConfig, build_index
from bayesretrieval.posterior import PosteriorMismatchError, load_posterior
from bayesretrieval.posterior.lastblock_posterior import LastBlockPosterior, item_covariance
from bayesretrieval.queries import Searcher
from bayesretrieval.store import IndexReader
from bayesretrieval.store import format as fmt
from bayesretrieval.world import make_world, read_world_table, write_world

QUERIES = ["a red circle", "a blue square on the left", "a small green triangle"]


def _pairs_table(root, path):
    table, _ = read_world_table(root)
    pd.DataFrame({"image": [str(root / "images" / p) for p in table["path"]],
                  "caption": table["caption"]}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny checkpoint, projection and last-block posteriors fitted on 64 pairs, a gallery of 30 images."""
    root = tmp_path_factory.mktemp("lastblock")
    checkpoint = save_tiny_checkpoint(root / "tiny.pt")
    train = write_world(make_world(64, seed=1, part="train"), root / "train")
    pairs = _pairs_table(train, root / "train.csv")
    gallery = write_world(make_world(30, seed=2), root / "gallery") / "images"
    model = ["--model", "bayes-tiny", "--pretrained", str(checkpoint)]
    assert cli.main(["fit-posterior", "--pairs", str(pairs), "-o", str(root / "projection"), "--chunk-size", "32",
                     *model]) == 0
    assert cli.main(["fit-posterior", "--pairs", str(pairs), "-o", str(root / "lastblock"), "--chunk-size", "32",
                     "--lastblock", "mlp", *model]) == 0
    return root, checkpoint, gallery, model


def _build(root, gallery, model, *argv):
    return cli.main(["build-index", str(gallery), str(root / "index"), *model, "--workers", "0", "--no-progress",
                     "--posterior", str(root / "projection"), *argv])


def test_the_index_stores_each_items_last_block_covariance(fitted, capsys):
    root, checkpoint, gallery, model = fitted
    assert _build(root, gallery, model, "--lastblock", str(root / "lastblock"), "--rebuild") == 0
    reader = IndexReader.open(root / "index")
    lastblock = LastBlockPosterior.load(root / "lastblock")
    assert reader.manifest.variance == "diag"
    assert reader.manifest.lastblock["fingerprint"] == lastblock.fingerprint
    assert reader.manifest.lastblock["scope"] == "mlp"
    stored = LastBlockPosterior.load(reader.version_dir / fmt.LASTBLOCK_DIR)
    assert stored.fingerprint == lastblock.fingerprint
    encoder = ClipEncoder.from_pretrained("bayes-tiny", str(checkpoint))
    paths = list(reader.paths(reader.item_ids))
    pixels = torch.stack([encoder.preprocess(Image.open(gallery / p).convert("RGB")) for p in paths])
    means, activations, factors = item_covariance(encoder, lastblock, pixels, "diag")
    np.testing.assert_allclose(reader.variance_diag, factors.variance_diag, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(reader.means, means.numpy(), rtol=1e-4, atol=1e-6)
    scales = reader.posterior.image.activation_scale(activations).numpy()
    np.testing.assert_allclose(reader.scalars[:, 0], scales, rtol=1e-4)
    capsys.readouterr()


def test_a_low_rank_last_block_index_stores_the_top_eigenpairs(fitted, tmp_path):
    root, checkpoint, gallery, model = fitted
    assert cli.main(["build-index", str(gallery), str(tmp_path / "i"), *model, "--workers", "0", "--no-progress",
                     "--posterior", str(root / "projection"), "--lastblock", str(root / "lastblock"),
                     "--variance", "lowrank:2"]) == 0
    reader = IndexReader.open(tmp_path / "i")
    encoder = ClipEncoder.from_pretrained("bayes-tiny", str(checkpoint))
    paths = list(reader.paths(reader.item_ids))
    pixels = torch.stack([encoder.preprocess(Image.open(gallery / p).convert("RGB")) for p in paths])
    _, _, factors = item_covariance(encoder, LastBlockPosterior.load(root / "lastblock"), pixels, "lowrank:2")
    assert reader.manifest.variance == "lowrank:2"
    np.testing.assert_allclose(reader.variance_diag, factors.variance_diag, rtol=1e-3, atol=1e-8)
    outer = lambda lowrank: np.einsum("nrd,nre->nde", lowrank, lowrank)  # noqa: E731  (sign-free)
    np.testing.assert_allclose(outer(reader.variance_lowrank), outer(factors.variance_lowrank), rtol=1e-3, atol=1e-8)


@pytest.mark.parametrize("score", ["expected", "lcb", "lcb_item"])
def test_search_over_the_last_block_index_equals_a_dense_reference(fitted, score):
    root, _, gallery, model = fitted
    if not (root / "index").exists():
        assert _build(root, gallery, model, "--lastblock", str(root / "lastblock")) == 0
    searcher = Searcher.open(root / "index", encoder=ClipEncoder.from_pretrained("bayes-tiny", str(fitted[1])))
    assert searcher.form.value == "diag"
    queries = searcher.encoder.encode_texts(QUERIES)
    reader = searcher.snapshot().reader
    text = reader.posterior.text
    means = torch.from_numpy(np.asarray(reader.means, dtype=np.float64))
    diag = torch.from_numpy(np.asarray(reader.variance_diag, dtype=np.float64))
    scores = np.empty((len(QUERIES), len(reader)))
    for qi in range(len(QUERIES)):
        b = queries.embeds[qi].double()
        cov_y = text.activation_scale(queries.activations[qi:qi + 1])[0] * text.output_cov.double()
        for i in range(len(reader)):
            mean, var = second_order_pair(means[i], torch.diag(diag[i]), b, cov_y)
            if score == "lcb_item":
                var = second_order_item_variance(means[i], torch.diag(diag[i]), b, cov_y)
            scores[qi, i] = float(mean - (0.0 if score == "expected" else 2.0) * var.sqrt())
    frame = searcher.search(queries, k=8, score=score, kappa=2.0)
    ref_ids, ref_values = brute_force_top_k(scores, reader.item_ids, 8)
    for qi in range(len(QUERIES)):
        rows = frame[frame.query_index == qi].sort_values("rank")
        np.testing.assert_allclose(rows.score.to_numpy(), ref_values[qi], rtol=1e-6, atol=1e-9)
        assert rows.item_id.tolist() == ref_ids[qi]
    assert frame.attrs["exact"]


def test_updates_keep_the_last_block_and_refuse_to_drop_it_silently(fitted, capsys):
    root, checkpoint, gallery, model = fitted
    assert _build(root, gallery, model, "--lastblock", str(root / "lastblock"), "--rebuild") == 0
    capsys.readouterr()
    assert _build(root, gallery, model) == 0
    assert "nothing changed" in capsys.readouterr().out
    extra = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(extra).save(gallery / "extra.png")
    try:
        assert _build(root, gallery, model) == 0
        assert "processed 1 files" in capsys.readouterr().out
        reader = IndexReader.open(root / "index")
        assert len(reader) == 31 and reader.manifest.lastblock["scope"] == "mlp"
        assert reader.manifest.format_version == fmt.LASTBLOCK_FORMAT_VERSION
        encoder = ClipEncoder.from_pretrained("bayes-tiny", str(checkpoint))
        _, _, factors = item_covariance(encoder, LastBlockPosterior.load(root / "lastblock"),
                                        encoder.preprocess(Image.open(gallery / "extra.png").convert("RGB"))[None],
                                        "diag")
        row = list(reader.paths(reader.item_ids)).index("extra.png")
        np.testing.assert_allclose(reader.variance_diag[row:row + 1], factors.variance_diag, rtol=1e-4, atol=1e-9)
        assert _build(root, gallery, model, "--lastblock", "none") == 2
        err = capsys.readouterr().err
        assert "last-block posterior: index has" in err and "command uses none" in err
        assert _build(root, gallery, model, "--lastblock", "none", "--rebuild") == 0
        manifest = json.loads((root / "index" / fmt.MANIFEST_FILE).read_text())
        assert manifest["lastblock"] == {} and manifest["variance"] == "kfac"  # --rebuild starts from the defaults
    finally:
        (gallery / "extra.png").unlink()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_last_block_build_on_the_gpu_equals_the_cpu_build(fitted, tmp_path):
    root, _, gallery, model = fitted
    common = [*model, "--workers", "0", "--no-progress", "--posterior", str(root / "projection"),
              "--lastblock", str(root / "lastblock")]
    assert cli.main(["build-index", str(gallery), str(tmp_path / "cpu"), *common]) == 0
    assert cli.main(["build-index", str(gallery), str(tmp_path / "gpu"), *common, "--device", "cuda"]) == 0
    cpu, gpu = IndexReader.open(tmp_path / "cpu"), IndexReader.open(tmp_path / "gpu")
    np.testing.assert_allclose(gpu.means, cpu.means, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(gpu.variance_diag, cpu.variance_diag, rtol=1e-3, atol=1e-8)


def test_shards_with_and_without_a_last_block_are_not_searched_together(fitted, tmp_path):
    root, checkpoint, gallery, model = fitted
    common = [*model, "--workers", "0", "--no-progress", "--posterior", str(root / "projection"), "--variance", "diag"]
    assert cli.main(["build-index", str(gallery), str(tmp_path / "a"), *common, "--lastblock",
                     str(root / "lastblock")]) == 0
    assert cli.main(["build-index", str(gallery), str(tmp_path / "b"), *common]) == 0
    encoder = ClipEncoder.from_pretrained("bayes-tiny", str(checkpoint))
    with pytest.raises(ValueError, match="has last-block posterior None, shard .* has [0-9a-f]{64}"):
        Searcher.open([tmp_path / "a", tmp_path / "b"], encoder=encoder)


def test_bad_last_block_requests_are_refused(fitted, tmp_path, capsys):
    root, checkpoint, gallery, _ = fitted
    lastblock = ["--lastblock", str(root / "lastblock")]

    def build(checkpoint, *argv):
        return cli.main(["build-index", str(gallery), str(tmp_path / "i"), "--model", "bayes-tiny", "--pretrained",
                         str(checkpoint), "--workers", "0", "--no-progress", "--posterior",
                         str(root / "projection"), "--force-posterior", *argv])

    assert build(checkpoint, *lastblock, "--variance", "kfac") == 2
    assert "use variance diag or lowrank:R" in capsys.readouterr().err
    assert build(checkpoint, "--lastblock", str(tmp_path / "missing")) == 2
    assert "no last-block posterior at" in capsys.readouterr().err
    other = save_tiny_checkpoint(tmp_path / "other.pt", seed=4)
    assert build(other, *lastblock, "--rebuild") == 0  # forced: warns
    assert IndexReader.open(tmp_path / "i").manifest.lastblock["source"].endswith("(forced)")
    encoder = ClipEncoder.from_pretrained("bayes-tiny", str(other))
    projection = dataclasses.replace(load_posterior(root / "projection"), model=encoder.identity)
    with pytest.raises(PosteriorMismatchError, match="last-block posterior fitted:.* was fitted for bayes-tiny/"):
        build_index(gallery, tmp_path / "j", encoder, projection, BuildConfig(workers=0, variance="diag"),
                    lastblock=LastBlockPosterior.load(root / "lastblock"))
    assert not (tmp_path / "j").exists()
    assert cli.main(["fit-posterior", "--encoded", str(tmp_path / "e.parquet"), "-o", str(tmp_path / "p"),
                     "--lastblock", "mlp"]) == 2
    assert "--lastblock fits from --pairs into --output only; drop --encoded" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
