"""benchmarks/zero_shot_calibration.py end to end with the test model (``--quick``): priors, methods, record, table."""

import json
import math

import numpy as np
import pytest
import torch
from benchmark_scripts import benchmark_module

from bayesretrieval.metrics import expected_calibration_error
from bayesretrieval.model import BayesCLIP
from bayesretrieval.posterior import FactorSpectrum, PriorObjective, optimize_prior_precision


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero_shot")
    with benchmark_module("zero_shot_calibration") as script:
        fitted = {}
        fit = script.fit_on_world

        def keep(*args, **kwargs):
            fitted["fitter"] = fit(*args, **kwargs)
            return fitted["fitter"]

        script.fit_on_world = keep
        figures = script.main(["--quick", "--output", str(tmp / "out.json")])
        yield script, figures, json.loads((tmp / "out.json").read_text()), fitted["fitter"]


def test_record_holds_every_task_set_and_method(run):
    script, figures, saved, _ = run
    assert saved["benchmark"] == "zero_shot_calibration" and saved["config"]["quick"] is True
    assert figures["model"] == "bayes-tiny" and len(figures["classes"]["shape"]) == 7
    assert set(figures["sets"]["colour"]) == {"clean", *(s.value for s in script.Shift)}
    assert set(figures["sets"]["shape"]) == set(figures["sets"]["colour"]) - {"novel_shape"}
    assert figures["sets"]["colour"]["clean"]["images"] == script.QUICK["n_test"]
    methods = {"deterministic", "temperature", *(f"{p}/{m}" for p in script.PRIORS
                                                 for m in ("probit", "montecarlo", "mean_only", "variance_only"))}
    for sets in figures["sets"].values():
        for entry in sets.values():
            assert set(entry["methods"]) == methods
            for name, scores in entry["methods"].items():
                for metric in ("accuracy", "nlpd", "ece"):
                    low, high = scores[metric]["ci"]
                    assert low <= scores[metric]["value"] <= high, (name, metric)
                if name != "temperature":
                    diff = entry["minus_temperature"][name]["ece"]
                    assert diff["value"] == pytest.approx(
                        scores["ece"]["value"] - entry["methods"]["temperature"]["ece"]["value"])
                    assert diff["ci"][0] <= diff["value"] <= diff["ci"][1]


def test_priors_as_bayesvlm_and_the_evidence_set_them(run):
    script, figures, _, fitter = run
    posteriors = script.posteriors_by_prior(fitter)
    assert [p.prior_precision for p in posteriors["evidence"]] == pytest.approx(list(fitter.prior_precision_))
    for side in posteriors["bayesvlm"]:
        assert side.pseudo_data_count == 10.0
        spectrum = FactorSpectrum.from_factors(side.factors["A"], side.factors["B"],
                                               fitter.metadata_.theta_sq_norm(side.modality))
        assert side.prior_precision == pytest.approx(
            optimize_prior_precision(spectrum, 10.0, PriorObjective.BAYESVLM_REFERENCE))
    assert figures["posterior"]["bayesvlm"]["lambda"] == [p.prior_precision for p in posteriors["bayesvlm"]]


def test_probit_and_monte_carlo_are_the_models_zero_shot_probabilities(run):
    script, _, _, fitter = run
    encoder = script.ClipEncoder.from_pretrained(script.model_name("test"), script.get_trained_model("test"))
    bayes = BayesCLIP(encoder, script.posteriors_by_prior(fitter)["bayesvlm"])
    world = script.single_object_world(12, seed=3)
    pixels = script.preprocess(encoder, world.images)
    prompts = script.TASKS["colour"].prompts()
    images = bayes.get_image_features(pixels)
    unit = torch.nn.functional.normalize(encoder.encode_images(pixels).embeds.double(), dim=1)
    cosines = unit @ torch.nn.functional.normalize(encoder.encode_texts(prompts).embeds.double(), dim=1).T
    args = script.parse_args(["--quick"])
    probs, diagnostics = script.prior_probabilities(bayes, images, prompts, cosines, args, seed=5)
    expected = bayes.zero_shot_probabilities(pixels, prompts, "probit").numpy()
    np.testing.assert_allclose(probs["probit"], expected, rtol=1e-6)
    mc = bayes.zero_shot_probabilities(pixels, prompts, "montecarlo", num_samples=args.mc_samples,
                                       generator=torch.Generator().manual_seed(5)).numpy()
    np.testing.assert_allclose(probs["montecarlo"], mc, rtol=1e-6)
    mean, _ = bayes.logit_moments(images, bayes.get_text_features(prompts))
    np.testing.assert_allclose(probs["mean_only"], torch.softmax(mean, 1).numpy(), rtol=1e-6)
    assert 0.8 < diagnostics["sampled_over_estimated_std_median"] < 1.2


def test_temperature_and_scores_against_references():
    with benchmark_module("zero_shot_calibration") as script:
        rng = np.random.default_rng(0)
        logits = rng.normal(size=(4000, 5)) * 4
        tempered = script._softmax(logits / 2.0)
        labels = np.array([rng.choice(5, p=p) for p in tempered])
        assert script.fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.1)
        scores = script.scores(tempered, labels)
        correct = tempered.argmax(1) == labels
        assert scores["ece"] == expected_calibration_error(tempered.max(1), correct, 20)
        assert scores["nlpd"] == pytest.approx(-np.mean(np.log(tempered[np.arange(4000), labels])))
        assert scores["accuracy"] == pytest.approx(correct.mean())
        assert scores["ece"] < 0.03 and not math.isnan(scores["nlpd"])


def test_tables_render_from_the_record(run):
    script, _, saved, _ = run
    blocks = script.formatters.FORMATTERS["zero_shot_calibration"](saved)
    assert blocks[0].startswith("Zero-shot classification") and "n = 10" in blocks[0]
    assert blocks[1] == "**shape**, ece:"
    header = blocks[2].splitlines()[0]
    assert header.startswith("| set | n | temperature | evidence/probit | evidence/montecarlo |")
    assert "evidence/probit - T" in header and "bayesvlm/mean_only - T" in header
    assert blocks[-1] == saved["figures"]["analysis"]
