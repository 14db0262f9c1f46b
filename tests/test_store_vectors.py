"""The vectors FAISS indexes: means over their expected norm, and what the store keeps beside them."""

import numpy as np
import pytest
from conftest import random_posterior
from test_store import empty_skipped, info, random_items

from bayesretrieval.store import IndexReader, ItemScalars, VarianceSpec, write_version
from bayesretrieval.store.vectors import expected_norm, faiss_vectors


def test_expected_norm_matches_its_definition():
    table = np.abs(np.random.default_rng(3).normal(size=(50, 6)))
    np.testing.assert_array_equal(expected_norm(ItemScalars.from_table(table), 0.7),
                                  np.sqrt(table[:, 1] + table[:, 0] * 0.7))


def test_faiss_vectors_are_the_rounded_float64_quotient_and_zero_rows_stay_zero():
    rng = np.random.default_rng(0)
    means = (rng.normal(size=(300, 24)) * np.exp(rng.normal(0, 3, (300, 1)))).astype(np.float32)
    means[:3] = 0
    norms = np.linalg.norm(means.astype(np.float64), axis=1) * 1.3
    got = faiss_vectors(means, norms)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got[3:], (means[3:].astype(np.float64) / norms[3:, None]).astype(np.float32))
    assert not np.any(got[:3])


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "IVF4,SQ8"])
def test_stored_means_are_the_encoder_output_for_every_factory(tmp_path, factory):
    items = random_items(600, 24, variance=VarianceSpec.parse("diag"))
    write_version(tmp_path, items, empty_skipped(), random_posterior(24, 5),
                  info(VarianceSpec.parse("diag"), factory=factory))
    reader = IndexReader.open(tmp_path)
    order = np.argsort(items.item_ids)
    np.testing.assert_array_equal(reader.means, items.means[order])
    np.testing.assert_array_equal(IndexReader.open(tmp_path, mmap=False).fetch(items.item_ids).means, items.means)


def test_item_scalars_are_named_columns():
    table = np.arange(12.0).reshape(2, 6)
    scalars = ItemScalars.from_table(table)
    np.testing.assert_array_equal(scalars.norm_sq, [1.0, 7.0])
    np.testing.assert_array_equal(scalars.quad("text", diagonal=True), [5.0, 11.0])
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 6\)"):
        ItemScalars.from_table(np.zeros((2, 5)))
