"""Query warnings: a query more uncertain than the posterior's fitting inputs says so."""

import numpy as np
import pytest
import torch
from conftest import SEARCH_DIM, SEARCH_IMAGE_WIDTH, SEARCH_TEXT_WIDTH, random_posterior, random_queries

from bayesretrieval.cli import main
from bayesretrieval.indexing.scalars import ScalarComputer
from bayesretrieval.posterior import Modality, PosteriorPair
from bayesretrieval.posterior.fit import EncodedPairs, ReferenceSample
from bayesretrieval.queries import Searcher
from bayesretrieval.queries.report import render_html
from bayesretrieval.queries.searcher import Queries, query_uncertainty
from bayesretrieval.store import IndexReader, ItemArrays, VarianceSpec, VersionInfo, write_version
from bayesretrieval.store.format import SKIPPED_SCHEMA

D, WIDTH = 64, 64


def encoded_pairs(n: int, seed: int = 0) -> EncodedPairs:
    g = torch.Generator().manual_seed(seed)
    return EncodedPairs(*(torch.randn(n, size, generator=g, dtype=torch.float64) for size in (WIDTH, D, WIDTH, D)))


def test_reference_sample_does_not_depend_on_how_the_stream_is_cut():
    pairs = encoded_pairs(3000)
    samples = []
    for cut in (7, 1000):
        sample = ReferenceSample(size=500)
        consumed = list(sample.watch(pairs.split(i)[1].split(cut)[0] for i in range(0, 3000, cut)))
        assert sum(map(len, consumed)) == 3000
        samples.append(sample._pairs.text_embeds)
    torch.testing.assert_close(samples[0], samples[1])
    assert len(samples[0]) == 500


def test_reference_percentiles_are_those_of_the_relative_variance():
    pairs, posterior = encoded_pairs(300), random_posterior(D, WIDTH)
    sample = ReferenceSample(size=1000)
    list(sample.watch([pairs]))
    reference = sample.percentiles(posterior)
    relative = posterior.text.activation_scale(pairs.text_activations) * torch.trace(posterior.text.output_cov)
    relative = relative / pairs.text_embeds.pow(2).sum(1)
    np.testing.assert_allclose(reference["text"], np.percentile(relative.numpy(), np.arange(101)), rtol=1e-12)
    assert reference["pairs"] == 300 and len(reference["image"]) == 101


def test_reference_survives_save_and_load(tmp_path):
    pair = random_posterior(D, WIDTH)
    pair.reference = {"image": list(np.linspace(0, 1, 101)), "text": list(np.linspace(0, 2, 101)), "pairs": 50}
    pair.save(tmp_path / "p")
    assert PosteriorPair.load(tmp_path / "p").reference == pair.reference


def queries_with_reference(percentile_of_fourth: float = 100.0):
    """Six text queries and a reference whose top percentile is the 4th smallest query's relative variance."""
    posterior = random_posterior(SEARCH_DIM, SEARCH_IMAGE_WIDTH, SEARCH_TEXT_WIDTH)
    encoded = random_queries(6)
    scales = posterior.text.activation_scale(encoded.activations)
    relative = posterior.text.relative_variance_from_scale(scales, encoded.embeds).numpy()
    limit = np.sort(relative)[3]
    posterior.reference = {"text": list(np.linspace(0, limit * 100 / percentile_of_fourth, 101))}
    queries = Queries([f"q{i}" for i in range(6)], encoded.embeds.double(), scales, Modality.TEXT)
    return posterior, queries, relative, limit


def test_queries_above_the_percentile_get_a_warning():
    posterior, queries, relative, limit = queries_with_reference()
    found = query_uncertainty(queries, posterior, percentile=99.0)
    warned = [i for i, w in enumerate(found["query_warning"]) if w]
    assert warned == sorted(np.nonzero(relative > 0.99 * limit)[0].tolist()) and len(warned) == 3
    assert "more uncertain than" in found["query_warning"][warned[0]]
    np.testing.assert_allclose(found["query_percentile"], np.minimum(relative / limit * 100, 100), rtol=1e-9)
    quiet = query_uncertainty(queries, PosteriorPair(posterior.image, posterior.text))
    assert quiet["query_warning"] == [None] * 6 and np.isnan(quiet["query_percentile"]).all()


def write_index(folder, posterior):
    rng = np.random.default_rng(0)
    n, dim, width = 40, posterior.image.out_features, posterior.image.in_features
    means = rng.normal(size=(n, dim))
    scalars = ScalarComputer(posterior).from_activations(torch.from_numpy(means), torch.from_numpy(
        rng.normal(size=(n, width)))).scalars
    unknown = np.full(n, -1)
    items = ItemArrays(np.arange(n), [f"img_{i}.png" for i in range(n)], unknown, unknown, unknown.astype(np.int32),
                       unknown.astype(np.int32), means.astype(np.float32), scalars)
    info = VersionInfo("images", str(folder), {"model_name": "bayes-tiny", "pretrained": None}, VarianceSpec(),
                       None, n)
    write_version(folder, items, SKIPPED_SCHEMA.empty_table(), posterior, info)
    return folder


def test_search_reports_warnings_in_attrs_cli_and_html(tmp_path, capsys):
    posterior, queries, relative, limit = queries_with_reference()
    index = write_index(tmp_path / "idx", posterior)
    searcher = Searcher(IndexReader.open(index), None, index)
    results = searcher.search(random_queries(6), k=3)
    assert [w is not None for w in results.attrs["query_warning"]] == list(relative > 0.99 * limit)
    page = render_html(results)
    assert page.count("class='warning'") == 3
    strict = Searcher(IndexReader.open(index), None, index, query_warning_percentile=100)
    assert sum(w is not None for w in strict.search(random_queries(6), k=3).attrs["query_warning"]) == 2
    with pytest.raises(ValueError, match="query_warning_percentile"):
        Searcher(IndexReader.open(index), None, index, query_warning_percentile=0)

    tiny = random_posterior(D, WIDTH)
    tiny.reference = {"text": list(np.linspace(0, 1e-9, 101))}
    cli_index = write_index(tmp_path / "cli", tiny)
    assert main(["search", str(cli_index), "a red circle", "-k", "2"]) == 0
    err = capsys.readouterr().err
    assert "warning: query 'a red circle' is more uncertain than" in err
