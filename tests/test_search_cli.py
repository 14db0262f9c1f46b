"""``bayesretrieval search`` / ``calibrate``: output formats, HTML page, and clear errors."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from reference import random_spd

from bayesretrieval.cli import main
from bayesretrieval.indexing.scalars import ScalarComputer
from bayesretrieval.posterior import KroneckerPosterior, PosteriorPair
from bayesretrieval.queries import Searcher
from bayesretrieval.store import ItemArrays, VarianceSpec, VersionInfo, write_version
from bayesretrieval.store.format import SKIPPED_SCHEMA

D = WIDTH = 64  # bayes-tiny: embed_dim 64, both towers 64 wide
N = 40


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
    """An index over N random items of bayes-tiny's shape, with a few real image files."""
    root = tmp_path_factory.mktemp("cli")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    posterior = PosteriorPair(
        KroneckerPosterior.from_factors(random_spd(WIDTH, g), random_spd(D, g), 10.0, 5.0, "image"),
        KroneckerPosterior.from_factors(random_spd(WIDTH, g), random_spd(D, g), 10.0, 5.0, "text"),
        source="cli-test",
    )
    rng = np.random.default_rng(0)
    paths = [f"sub/img_{i:02d}.png" for i in range(N)]
    for i, path in enumerate(paths[:5]):
        Image.fromarray(np.full((32, 32, 3), i * 40, np.uint8)).save(images / path)
    means = rng.normal(size=(N, D)).astype(np.float32)
    rows = ScalarComputer(posterior).from_activations(torch.from_numpy(means).double(),
                                                      torch.from_numpy(rng.normal(size=(N, WIDTH))))
    ids = np.arange(N, dtype=np.int64) * 2 + 1
    items = ItemArrays(ids, paths, np.full(N, 10), np.full(N, 1), np.full(N, 32, np.int32), np.full(N, 32, np.int32),
                       means, rows.scalars)
    info = VersionInfo("images", str(images), {"model_name": "bayes-tiny", "pretrained": None,
                                               "checkpoint_sha256": None}, VarianceSpec(), None, int(ids.max()) + 1)
    write_version(root / "index", items, SKIPPED_SCHEMA.empty_table(), posterior, info)
    return root / "index"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_table_json_and_csv(tiny_index, capsys):
    code, out, _ = run_cli(capsys, "search", tiny_index, "a red circle", "-k", "3", "--score", "lcb", "--kappa", "1")
    assert code == 0 and "a red circle" in out and "sub/img_" in out and "±" in out
    code, out, _ = run_cli(capsys, "search", tiny_index, "a red circle", "a blue square", "-k", "3", "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["score"] == "expected" and len(data["results"]) == 6 and data["exact"]
    assert {"query", "rank", "item_id", "path", "score", "cosine_mean", "cosine_std", "logit_mean",
            "logit_std"} <= set(data["results"][0])
    code, out, _ = run_cli(capsys, "search", tiny_index, "x", "-k", "1000", "--format", "csv")
    frame = pd.read_csv(__import__("io").StringIO(out))
    assert code == 0 and len(frame) == N and sorted(frame["rank"]) == list(range(1, N + 1))


def test_html_page(tiny_index, tmp_path, capsys):
    page = tmp_path / "out.html"
    code, _, err = run_cli(capsys, "search", tiny_index, "a red <circle>", "-k", str(N), "--html", page)
    html = page.read_text()
    assert code == 0 and "wrote" in err
    assert html.count("<svg") == N and "data:image/jpeg;base64," in html and "no image" in html
    assert "a red &lt;circle&gt;" in html and "unsure" in html


def test_filters_from_the_command_line(tiny_index, capsys):
    code, out, _ = run_cli(capsys, "search", tiny_index, "q", "-k", "50", "--ids", "1,3,5", "--format", "json")
    assert code == 0 and sorted(r["item_id"] for r in json.loads(out)["results"]) == [1, 3, 5]
    code, out, _ = run_cli(capsys, "search", tiny_index, "q", "-k", "50", "--glob", "sub/img_0?.png",
                           "--where", "width == 32", "--format", "json")
    assert code == 0 and len(json.loads(out)["results"]) == 10


def test_query_files(tiny_index, tmp_path, capsys):
    (tmp_path / "q.txt").write_text("a red circle\n\na blue square\n")
    (tmp_path / "q.json").write_text(json.dumps(["one", "two", "three"]))
    for name, count in (("q.txt", 2), ("q.json", 3)):
        code, out, _ = run_cli(capsys, "search", tiny_index, "--query-file", tmp_path / name, "-k", "1",
                               "--format", "json")
        assert code == 0 and len(json.loads(out)["results"]) == count


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "bad.json").write_text("{oops")
    (tmp_path / "empty_dir").mkdir()
    return tmp_path


@pytest.mark.parametrize("argv,message", [
    (["{index}", ""], "empty"),
    (["{index}"], "no query"),
    (["{index}", "q", "-k", "0"], "-k must be a positive integer"),
    (["{index}", "q", "--score", "best"], "unknown score"),
    (["{index}", "q", "--score", "probability"], "calibrat"),
    (["{index}", "q", "--estimator", "magic"], "unknown estimator"),
    (["{tmp}/missing", "q"], "not found"),
    (["{tmp}/empty_dir", "q"], "no index"),
    (["{index}", "--query-file", "{tmp}/bad.json"], "does not parse"),
    (["{index}", "--query-file", "{tmp}/nope.txt"], "not found"),
    (["{index}", "q", "--ids", "1,x"], "--ids"),
    (["{index}", "q", "--ids", "1,99999"], "--ids: 1 ids are not in the index, e.g. [99999]"),
    (["{index}", "q", "--where", "no_such_column > 1"], "predicate"),
    (["{index}", "q", "--kappa", "-1", "--score", "lcb"], "kappa"),
])
def test_bad_input_is_one_line_exit_2(tiny_index, bad_files, capsys, argv, message):
    argv = [a.format(index=tiny_index, tmp=bad_files) for a in argv]
    code, _, err = run_cli(capsys, "search", *argv)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_calibrate_then_probability_and_threshold(tiny_index, tmp_path, capsys):
    rng = np.random.default_rng(1)
    pairs = pd.DataFrame({"query": rng.choice(["a", "b", "c", "d"], 400), "item_id": rng.integers(0, N, 400) * 2 + 1,
                          "label": rng.integers(0, 2, 400)})
    pairs.to_csv(tmp_path / "pairs.csv", index=False)
    code, out, _ = run_cli(capsys, "calibrate", tiny_index, tmp_path / "pairs.csv", "--holdout", "0.5")
    report = json.loads(out)
    assert code == 0 and report["pairs"] == 400 and "ece" in report["holdout"]["probit"]
    assert (tiny_index / "calibration.json").is_file()
    code, out, _ = run_cli(capsys, "search", tiny_index, "a", "-k", "5", "--score", "probability", "--format", "json")
    probabilities = [r["probability"] for r in json.loads(out)["results"]]
    assert code == 0 and probabilities == sorted(probabilities, reverse=True)
    code, out, _ = run_cli(capsys, "search", tiny_index, "a", "-k", "5", "--threshold", "0.999", "--format", "json")
    assert code == 0 and all(r["probability"] >= 0.999 for r in json.loads(out)["results"])
    pd.DataFrame({"query": ["a"], "path": ["nope.png"], "label": [1]}).to_csv(tmp_path / "bad.csv", index=False)
    code, _, err = run_cli(capsys, "calibrate", tiny_index, tmp_path / "bad.csv")
    assert code == 2 and "not in the index" in err
    pairs.assign(label=pairs.label * 2).to_csv(tmp_path / "bad.csv", index=False)
    code, _, err = run_cli(capsys, "calibrate", tiny_index, tmp_path / "bad.csv")
    assert code == 2 and "column label must be 0/1 or booleans, got 2" in err
    (tiny_index / "calibration.json").unlink()


def test_image_queries(tiny_index, capsys):
    image = tiny_index.parent / "images" / "sub" / "img_01.png"
    code, out, _ = run_cli(capsys, "search", tiny_index, "--image", image, "-k", "3", "--format", "json")
    results = json.loads(out)["results"]
    assert code == 0 and len(results) == 3 and results[0]["query"].endswith("img_01.png")
    code, _, err = run_cli(capsys, "search", tiny_index, "text", "--image", image)
    assert code == 2 and "not both" in err
    code, _, err = run_cli(capsys, "search", tiny_index, "--image", tiny_index / "manifest.json")
    assert code == 2 and "cannot read image" in err


def test_in_memory_and_torch_threads_change_nothing_but_speed(tiny_index, capsys):
    argv = ["search", tiny_index, "a red circle", "-k", "5", "--score", "lcb", "--format", "json"]
    torch.manual_seed(0)  # bayes-tiny loads with random weights: the same ones in both runs
    _, mapped, _ = run_cli(capsys, *argv)
    threads = torch.get_num_threads()
    try:
        torch.manual_seed(0)
        code, loaded, _ = run_cli(capsys, *argv, "--in-memory", "--torch-threads", "1")
        assert code == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert json.loads(loaded)["results"] == json.loads(mapped)["results"]
    code, _, err = run_cli(capsys, *argv, "--torch-threads", "0")
    assert code == 2 and "torch_threads must be at least 1" in err


def test_a_bare_pil_image_searches_like_a_list_of_one(tiny_index):
    searcher = Searcher.open(tiny_index)
    image = Image.open(tiny_index.parent / "images" / "sub" / "img_01.png")
    bare, listed = searcher.search(image, k=3), searcher.search([image], k=3)
    assert len(bare) == 3 and bare.item_id.tolist() == listed.item_id.tolist()
