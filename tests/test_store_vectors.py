"""Stored means that the FAISS index reproduces bit for bit, and reading them from there."""

import json

import faiss
import numpy as np
import pytest

from bayesretrieval.queries.rows import StoredRows
from bayesretrieval.store import IndexReader, VarianceSpec, build_faiss_index, write_version
from bayesretrieval.store import format as fmt
from bayesretrieval.store import vectors
from bayesretrieval.store.vectors import expected_norm, faiss_vectors, invertible_means, means_from_vectors
from test_store import empty_skipped, info, random_items, random_posterior


def wide_range_means(n=3000, d=48, seed=0):
    """Means over many binades, some all-zero rows, and their norms ``s`` (noise ratio 0.01 to 10)."""
    rng = np.random.default_rng(seed)
    means = (rng.normal(size=(n, d)) * np.exp(rng.normal(0, 3, (n, 1)))).astype(np.float32)
    means[:5] = 0
    norm_sq = (means.astype(np.float64) ** 2).sum(1)
    return means, np.sqrt(norm_sq * (1 + np.exp(rng.normal(-1, 1.5, n))))


def ulps_apart(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Units in the last place between float32 arrays of the same signs."""
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


def test_invertible_means_are_reproduced_exactly_and_move_at_most_one_ulp():
    means, norms = wide_range_means()
    raw_round_trip = means_from_vectors(faiss_vectors(means, norms), norms)
    assert np.mean(raw_round_trip != means) > 0.01  # the encoder's means alone do not survive the round trip
    fixed = invertible_means(means, norms)
    np.testing.assert_array_equal(means_from_vectors(faiss_vectors(fixed, norms), norms), fixed)
    assert ulps_apart(fixed, means).max() <= 1
    np.testing.assert_array_equal(invertible_means(fixed, norms), fixed)  # a rebuild leaves them as they are
    assert not np.any(fixed[:5]) and not np.any(faiss_vectors(fixed[:5], np.zeros(5)))


def test_means_from_vectors_in_place_equal_a_new_array():
    means, norms = wide_range_means()
    vectors = faiss_vectors(means, norms)
    expected = means_from_vectors(vectors, norms)
    assert np.mean(expected != vectors) > 0.5  # the scaling does change them
    written = means_from_vectors(vectors, norms, out=vectors)
    assert written is vectors
    np.testing.assert_array_equal(vectors, expected)


def test_chunks_change_nothing(monkeypatch):
    means, norms = wide_range_means(n=500)
    whole = invertible_means(means, norms), faiss_vectors(means, norms)
    monkeypatch.setattr(vectors, "CHUNK_ROWS", 7)
    np.testing.assert_array_equal(invertible_means(means, norms), whole[0])
    np.testing.assert_array_equal(faiss_vectors(means, norms), whole[1])


def test_expected_norm_matches_its_definition():
    rng = np.random.default_rng(3)
    scalars = np.abs(rng.normal(size=(50, 6)))
    np.testing.assert_array_equal(expected_norm(scalars, 0.7), np.sqrt(scalars[:, 1] + scalars[:, 0] * 0.7))


def written(tmp_path, factory, n=600, d=24, seed=0):
    posterior = random_posterior(d, 5)
    items = random_items(n, d, seed=seed, variance=VarianceSpec.parse("diag"))
    items.scalars[:, 0] *= 0.05  # noise ratio q tr Sigma_I / |mu|^2 of a few per cent, as for real images
    write_version(tmp_path, items, empty_skipped(), posterior, info(VarianceSpec.parse("diag"), factory=factory))
    return IndexReader.open(tmp_path), items


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat"])
def test_faiss_index_reproduces_every_stored_mean(tmp_path, factory):
    reader, items = written(tmp_path, factory)
    assert reader.manifest.faiss_vectors == fmt.FAISS_VECTORS
    rows = np.arange(len(reader))
    np.testing.assert_array_equal(reader.indexed_means(rows, np.asarray(reader.scalars)), reader.means)
    order = np.argsort(items.item_ids)
    assert ulps_apart(np.asarray(reader.means), items.means[order]).max() <= 1
    if factory.startswith("IVF"):
        assert not faiss.downcast_index(reader.faiss_index.index).direct_map.no()  # stored, not rebuilt on open


def test_rebuilding_keeps_the_stored_means(tmp_path):
    reader, items = written(tmp_path / "a", "Flat")
    items.means[np.argsort(items.item_ids)] = reader.means
    write_version(tmp_path / "a", items, empty_skipped(), reader.posterior,
                  info(VarianceSpec.parse("diag"), factory="Flat"))
    np.testing.assert_array_equal(IndexReader.open(tmp_path / "a").means, reader.means)


def test_lossy_or_older_indexes_read_means_from_the_array(tmp_path):
    assert written(tmp_path / "sq", "IVF4,SQ8")[0].indexed_means is None
    reader, _ = written(tmp_path / "old", "Flat")
    manifest_file = reader.version_dir / fmt.MANIFEST_FILE
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "faiss_vectors": fmt.FAISS_VECTORS_APPROXIMATE}))
    assert IndexReader(reader.version_dir).indexed_means is None


def test_faiss_ids_out_of_row_order_are_refused(tmp_path):
    reader, _ = written(tmp_path, "Flat")
    order = np.arange(len(reader))[::-1]
    vectors_ = faiss_vectors(np.asarray(reader.means)[order], reader.expected_norm()[order])
    faiss.write_index(build_faiss_index(vectors_, np.asarray(reader.item_ids)[order], "Flat"),
                      str(reader.version_dir / fmt.FAISS_FILE))
    with pytest.raises(ValueError, match="row order"):
        IndexReader(reader.version_dir).indexed_means


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat"])
def test_candidates_gathered_from_the_index_equal_the_arrays(tmp_path, factory):
    reader, _ = written(tmp_path, factory)
    rng = np.random.default_rng(1)
    ids = np.asarray(reader.item_ids)[rng.integers(0, len(reader), (7, 9))]
    ids[2, 4:] = -1
    from_arrays = StoredRows(reader.id_lookup, reader.means, reader.scalars, reader.variance_diag)
    from_index = StoredRows(reader.id_lookup, reader.means, reader.scalars, reader.variance_diag, reader.indexed_means)
    for form in ("kfac", "diag"):
        want, got = from_arrays.gather(ids, form), from_index.gather(ids, form)
        assert got.means.dtype == np.float32 and got.means.shape == (7, 9, 24)
        for field in ("means", "scalars", "variance_diag"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
