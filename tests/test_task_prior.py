"""Choosing n and lambda by the held-out retrieval likelihood (the probit softmax over a batch)."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import random_posterior
from scipy import special

from bayesretrieval.posterior import KroneckerPosterior, PosteriorPair
from bayesretrieval.posterior.fit import EncodedPairs
from bayesretrieval.posterior.task_prior import retrieval_log_likelihood, tune_prior

D, H, N = 8, 12, 40


def held_out(seed=0, noise=0.6):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(N, D, generator=g, dtype=torch.float64)
    texts = images + noise * torch.randn(N, D, generator=g, dtype=torch.float64)  # caption i matches image i
    return EncodedPairs(torch.randn(N, H, generator=g, dtype=torch.float64), images,
                        torch.randn(N, H, generator=g, dtype=torch.float64), texts)


def test_without_posterior_noise_it_is_the_softmax_likelihood_of_the_mean_cosines():
    pairs, s = held_out(), 7.0
    certain = random_posterior(D, H)
    certain = PosteriorPair(*(side.with_prior(1.0, 1e16) for side in certain))
    x = pairs.image_embeds.numpy() / np.linalg.norm(pairs.image_embeds.numpy(), axis=1, keepdims=True)
    y = pairs.text_embeds.numpy() / np.linalg.norm(pairs.text_embeds.numpy(), axis=1, keepdims=True)
    expected = np.mean(np.diag(special.log_softmax(s * x @ y.T, axis=0)))
    assert retrieval_log_likelihood(certain, pairs, s) == pytest.approx(expected, rel=1e-6)


def test_more_posterior_noise_flattens_the_softmax():
    pairs, posterior = held_out(noise=0.1), random_posterior(D, H)
    values = [retrieval_log_likelihood(PosteriorPair(*(side.with_prior(1.0, lam) for side in posterior)), pairs, 30.0)
              for lam in (1e6, 1e2, 1.0, 1e-2)]
    assert values == sorted(values, reverse=True) and values[0] - values[-1] > 0.1


def test_tuning_takes_the_grids_best_and_rebuilds_both_towers():
    pairs, posterior = held_out(seed=1), random_posterior(D, H, seed=3)
    factors = (0.01, 1.0, 100.0)
    tuned, report = tune_prior(posterior, pairs, 20.0, factors)
    cells = {(c["n_factor"], c["lambda_factor"]): c["log_likelihood"] for c in report["grid"]}
    assert len(cells) == 9 and report["log_likelihood"] == max(cells.values()) >= report["evidence_log_likelihood"]
    assert report["evidence_log_likelihood"] == pytest.approx(cells[(1.0, 1.0)])
    fn, fl = report["n_factor"], report["lambda_factor"]
    for old, new in zip(posterior, tuned):
        assert new.pseudo_data_count == pytest.approx(old.pseudo_data_count * fn)
        assert new.prior_precision == pytest.approx(old.prior_precision * fl)
        rebuilt = old.with_prior(old.pseudo_data_count * fn, old.prior_precision * fl)
        torch.testing.assert_close(new.output_cov, rebuilt.output_cov)
    assert retrieval_log_likelihood(tuned, pairs, 20.0) == pytest.approx(report["log_likelihood"])
    assert tuned.source.endswith("task-prior") and tuned.reference["pairs"] == N
    relative = tuned.image.relative_variance(pairs.image_embeds, pairs.image_activations)
    assert tuned.reference["image"] == torch.quantile(relative, torch.linspace(0, 1, 101, dtype=torch.float64)).tolist()


def test_a_posterior_without_curvature_factors_cannot_be_tuned():
    bare = KroneckerPosterior(torch.eye(H, dtype=torch.float64), torch.eye(D, dtype=torch.float64), "image")
    with pytest.raises(ValueError, match="raw curvature factors"):
        tune_prior(PosteriorPair(bare, bare), held_out(), 10.0, (1.0,))


def test_the_likelihood_averages_over_batches():
    pairs, posterior = held_out(seed=2), random_posterior(D, H, seed=1)
    parts = [pairs.take(torch.arange(start, stop)) for start, stop in ((0, 14), (14, 28), (28, 40))]
    want = sum(len(p) * retrieval_log_likelihood(posterior, p, 9.0) for p in parts) / N
    assert retrieval_log_likelihood(posterior, pairs, 9.0, batch_size=16) == pytest.approx(want, rel=1e-12)
    assert retrieval_log_likelihood(posterior, pairs, 9.0, batch_size=N) != pytest.approx(want, rel=1e-6)


def _world_table(root, count, seed, path):
    """A world written to ``root`` as a pairs CSV with absolute image paths."""
    from bayesretrieval.world import make_world, read_world_table, write_world

    write_world(make_world(count, seed=seed, part="train"), root)
    table, _ = read_world_table(root)
    pd.DataFrame({"image": [str(root / "images" / p) for p in table["path"]],
                  "caption": table["caption"]}).to_csv(path, index=False)
    return path


def test_fit_posterior_chooses_the_prior_on_held_out_pairs(tmp_path, monkeypatch, capsys):
    from conftest import save_tiny_checkpoint

    from bayesretrieval import cli
    from bayesretrieval.encoders import ClipEncoder
    from bayesretrieval.posterior import load_posterior
    from bayesretrieval.posterior.fit import load_pairs

    checkpoint = save_tiny_checkpoint(tmp_path / "tiny.pt")
    train = _world_table(tmp_path / "train", 40, 1, tmp_path / "train.csv")
    held = _world_table(tmp_path / "held", 48, 2, tmp_path / "held.csv")
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("bayesretrieval.commands.fit_posterior",))
    base = ["--model", "bayes-tiny", "--pretrained", str(checkpoint), "--chunk-size", "20"]

    def fit(*argv):
        return cli.main(["fit-posterior", *argv, *base])

    encoded = str(tmp_path / "t.parquet")
    assert fit("--pairs", str(train), "-o", str(tmp_path / "evidence"), "--save-encoded", encoded) == 0
    assert fit("--pairs", str(train), "-o", str(tmp_path / "tuned"), "--task-prior", str(held)) == 0
    printed = capsys.readouterr().out
    assert "task prior on 48 held-out pairs: n x " in printed
    encoder = ClipEncoder.from_pretrained("bayes-tiny", str(checkpoint))
    want, report = tune_prior(load_posterior(tmp_path / "evidence"), load_pairs(held, encoder)[1], encoder.logit_scale)
    got = load_posterior(tmp_path / "tuned")
    assert f"retrieval log-likelihood {report['log_likelihood']:.4f}" in printed
    for mine, theirs in zip(got, want):
        assert mine.pseudo_data_count == pytest.approx(theirs.pseudo_data_count)
        assert mine.prior_precision == pytest.approx(theirs.prior_precision)
    assert got.source.endswith("task-prior") and got.reference["pairs"] == 48
    assert got.reference["text"] == pytest.approx(want.reference["text"], rel=1e-5)

    assert fit("--pairs", str(held), "--save-encoded", str(tmp_path / "h.parquet"), "--encode-only") == 0
    assert fit("--encoded", encoded, "-o", str(tmp_path / "from-encoded"),
               "--task-prior", str(tmp_path / "h.parquet")) == 0
    for mine, theirs in zip(load_posterior(tmp_path / "from-encoded"), got):
        assert (mine.pseudo_data_count, mine.prior_precision) == pytest.approx(
            (theirs.pseudo_data_count, theirs.prior_precision))
    capsys.readouterr()

    assert fit("--pairs", str(train), "-o", str(tmp_path / "x"), "--task-prior", str(tmp_path / "gone.csv")) == 2
    assert "--task-prior: " in capsys.readouterr().err and not (tmp_path / "x").exists()
    other = save_tiny_checkpoint(tmp_path / "other.pt", seed=5)
    assert cli.main(["fit-posterior", "--pairs", str(held), "--save-encoded", str(tmp_path / "o.parquet"),
                     "--encode-only", "--model", "bayes-tiny", "--pretrained", str(other)]) == 0
    assert fit("--encoded", encoded, "-o", str(tmp_path / "x"),
               "--task-prior", str(tmp_path / "o.parquet")) == 2
    assert "were encoded with" in capsys.readouterr().err and not (tmp_path / "x").exists()
