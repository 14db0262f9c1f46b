"""The HTTP service over several index directories (shards) through FastAPI's test client and over loopback.

Two real indexes built from two folders with one model and posterior; every answer is
checked against the :class:`~bayesretrieval.queries.ShardedSearcher` or against each
shard's own index.
"""

import io
import json
import urllib.request

import numpy as np
import pandas as pd
import pytest
from conftest import write_images
from PIL import Image
from servers import build, http, running_server

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="the test extra lacks httpx")

from fastapi.testclient import TestClient  # noqa: E402
from test_service import assert_json_error, write_crafted_index  # noqa: E402

from bayesretrieval.options import HIGH_UNCERTAINTY_PERCENTILE  # noqa: E402
from bayesretrieval.queries import SHARDED_RESULT_COLUMNS, Searcher, ShardedSearcher, audit_index  # noqa: E402
from bayesretrieval.service.app import create_app  # noqa: E402

D = 64
SHARD_NAMES = [[f"{folder}/a{i}.png" for folder in ("cats", "dogs") for i in range(3)],
               [f"birds/b{i}.png" for i in range(4)]]
QUERIES = ["a red circle", "a dog"]


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory, encoder, posterior):
    """Two index directories over two folders of different images."""
    root = tmp_path_factory.mktemp("shards")
    for shard, names in enumerate(SHARD_NAMES):
        write_images(root / f"img{shard}", names, seed=shard)
        build(root / f"img{shard}", root / f"idx{shard}", encoder, posterior)
    return [root / f"idx{shard}" for shard in range(len(SHARD_NAMES))]


@pytest.fixture(scope="module")
def sharded(shard_dirs, encoder):
    with Searcher.open(shard_dirs, encoder=encoder, auto_refresh=True) as opened:
        yield opened


@pytest.fixture(scope="module")
def client(shard_dirs, sharded):
    return TestClient(create_app(shard_dirs, searcher=sharded))


def union_audit(sharded: ShardedSearcher, by: str) -> pd.DataFrame:
    """Every item of every shard with its ranking score ``by`` and its percentile over the union (reference)."""
    frames = [audit_index(searcher.reader, None, by=by).assign(shard=shard)
              for shard, searcher in enumerate(sharded.searchers)]
    union = pd.concat(frames, ignore_index=True)
    ranking = union[by].to_numpy()
    union["union_percentile"] = 100.0 * (ranking[None, :] <= ranking[:, None]).mean(axis=1)
    return union.set_index(["shard", "item_id"])


def test_text_search_over_shards_answers_as_the_sharded_searcher(client, sharded):
    answer = client.post("/api/search", json={"queries": QUERIES, "k": 6, "score": "lcb", "kappa": 0.5}).json()
    expected = sharded.search(QUERIES, k=6, score="lcb", kappa=0.5)
    rows = [row for query in answer["queries"] for row in query["results"]]
    assert all(list(row) == [*SHARDED_RESULT_COLUMNS, "item_percentile", "high_uncertainty"] for row in rows)
    assert [(r["shard"], r["item_id"], r["path"]) for r in rows] == list(zip(expected.shard, expected.item_id,
                                                                             expected.path))
    np.testing.assert_allclose([r["score"] for r in rows], expected.score, rtol=1e-12)
    assert {r["shard"] for r in rows} == {0, 1} and answer["exact"] is True
    assert answer["version"] == expected.attrs["version"] == ["v000001", "v000001"]
    union = union_audit(sharded, client.get("/api/version").json()["high_uncertainty"]["by"])
    np.testing.assert_allclose([r["item_percentile"] for r in rows],
                               union.loc[list(zip(expected.shard, expected.item_id)), "union_percentile"])


def test_image_search_over_shards_finds_the_uploaded_image_in_its_shard(client, sharded, shard_dirs):
    source = shard_dirs[1].parent / "img1" / SHARD_NAMES[1][2]
    response = client.post("/api/search/image", files={"image": ("q.png", source.read_bytes(), "image/png")},
                           data={"k": "4"})
    assert response.status_code == 200, response.text
    results = response.json()["queries"][0]["results"]
    assert (results[0]["shard"], results[0]["path"]) == (1, SHARD_NAMES[1][2])
    with Image.open(source) as image:
        expected = sharded.search(image.convert("RGB"), k=4)
    assert [(r["shard"], r["item_id"]) for r in results] == list(zip(expected.shard, expected.item_id))


def test_items_and_thumbnails_are_named_by_shard_and_id(client, sharded, shard_dirs):
    union = union_audit(sharded, client.get("/api/version").json()["high_uncertainty"]["by"])
    for shard, searcher in enumerate(sharded.searchers):
        assert 0 in searcher.reader.item_ids  # the same id names an item in each shard
        answer = client.get("/api/items/0", params={"shard": shard}).json()
        path = searcher.reader.paths([0])[0]
        assert (answer["shard"], answer["item_id"], answer["path"]) == (shard, 0, path)
        with Image.open(shard_dirs[shard].parent / f"img{shard}" / path) as image:
            assert (answer["width"], answer["height"]) == image.size
        assert answer["percentile"] == pytest.approx(union.loc[(shard, 0), "union_percentile"])
        assert answer["thumbnail"] == f"/api/items/0/thumbnail?shard={shard}"
        thumbnail = client.get(answer["thumbnail"] + "&size=32")
        assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(thumbnail.content)) as image, Image.open(
                shard_dirs[shard].parent / f"img{shard}" / path) as original:
            assert max(image.size) == 32 and image.size[0] / image.size[1] == pytest.approx(
                original.size[0] / original.size[1], rel=0.1)
    assert client.get("/api/items/5", params={"shard": 0}).status_code == 200
    assert "no item 5 of shard 1" in assert_json_error(client.get("/api/items/5", params={"shard": 1}), 404)


@pytest.mark.parametrize("url", ["/api/items/0", "/api/items/0/thumbnail"])
def test_bad_shard_numbers_are_refused_with_a_json_4xx(client, url):
    for shard in ("2", "-1", "abc", "1.5", "../idx0", "/etc/passwd"):
        assert_json_error(client.get(url, params={"shard": shard}), 422)
    assert "name the item's shard (shard=0..1)" in assert_json_error(client.get(url), 400)


def test_one_index_directory_is_shard_0(shard_dirs, encoder):
    with Searcher.open(shard_dirs[0], encoder=encoder) as searcher:
        single = TestClient(create_app(shard_dirs[0], searcher=searcher))
        assert single.get("/api/items/0").json() == single.get("/api/items/0", params={"shard": 0}).json()
        assert single.get("/api/items/0").json()["thumbnail"] == "/api/items/0/thumbnail"
        assert_json_error(single.get("/api/items/0/thumbnail", params={"shard": 1}), 422)
        version = single.get("/api/version").json()
    assert version["index_version"] == "v000001" and version["shards"] == [
        {"shard": 0, "index_version": "v000001", "created_at": version["created_at"],
         "item_count": len(SHARD_NAMES[0])}]


def test_the_audit_covers_every_shard(client, sharded):
    answer = client.get("/api/audit", params={"k": 5}).json()
    union = union_audit(sharded, answer["by"])
    want = union.sort_values("union_percentile", ascending=False, kind="stable").head(5)
    assert [(r["shard"], r["item_id"]) for r in answer["items"]] == want.index.tolist()
    np.testing.assert_allclose([r["percentile"] for r in answer["items"]], want.union_percentile)
    assert [r["path"] for r in answer["items"]] == want.path.tolist() and [r["rank"] for r in answer["items"]] == [
        1, 2, 3, 4, 5]
    assert answer["item_count"] == sum(map(len, SHARD_NAMES)) and answer["version"] == ["v000001", "v000001"]


def test_version_lists_each_shard_and_the_threshold_over_their_union(client, sharded):
    version = client.get("/api/version").json()
    assert version["index_version"] == ["v000001", "v000001"] and version["item_count"] == sum(map(len, SHARD_NAMES))
    assert [(s["shard"], s["index_version"], s["item_count"]) for s in version["shards"]] == [
        (0, "v000001", len(SHARD_NAMES[0])), (1, "v000001", len(SHARD_NAMES[1]))]
    mark = version["high_uncertainty"]
    ranking = union_audit(sharded, mark["by"])[mark["by"]].to_numpy()
    assert mark["threshold"] == pytest.approx(np.quantile(ranking, HIGH_UNCERTAINTY_PERCENTILE / 100,
                                                          method="inverted_cdf"))
    assert version["calibrated"] == {"text": False, "image": False}
    paths = client.get("/openapi.json").json()["paths"]
    assert any(p["name"] == "shard" for p in paths["/api/items/{item_id}"]["get"]["parameters"])


def test_each_shard_moves_to_its_new_version(tmp_path, encoder, posterior):
    for shard in range(2):
        write_images(tmp_path / f"img{shard}", [f"x{shard}.png", "y.png"], seed=shard)
        build(tmp_path / f"img{shard}", tmp_path / f"idx{shard}", encoder, posterior)
    dirs = [tmp_path / "idx0", tmp_path / "idx1"]
    with Searcher.open(dirs, encoder=encoder, auto_refresh=True) as sharded:
        client = TestClient(create_app(dirs, searcher=sharded))
        assert client.get("/api/version").json()["item_count"] == 4
        write_images(tmp_path / "img1", ["z.png"], seed=7)
        build(tmp_path / "img1", dirs[1], encoder, posterior)
        assert sharded.refresh() and not sharded.refresh()
        answer = client.post("/api/search", json={"queries": "x", "k": 5}).json()
        assert answer["version"] == ["v000001", "v000002"] and len(answer["queries"][0]["results"]) == 5
        version = client.get("/api/version").json()
        assert [s["item_count"] for s in version["shards"]] == [2, 3] and version["item_count"] == 5
        new_id = next(r["item_id"] for r in answer["queries"][0]["results"] if r["path"] == "z.png")
        assert client.get(f"/api/items/{new_id}", params={"shard": 1}).json()["version"] == "v000002"
        assert client.get("/api/audit", params={"k": 10}).json()["item_count"] == 5


def test_thumbnails_never_leave_each_shards_indexed_folder(tmp_path, shard_dirs, encoder, posterior):
    source, outside = tmp_path / "src", tmp_path / "secret"
    write_images(source, ["ok.png"])
    write_images(outside, ["secret.png"], seed=1)
    (source / "link.png").symlink_to(outside / "secret.png")
    paths = ["ok.png", "../secret/secret.png", str(outside / "secret.png"), "link.png", "%2e%2e/secret/secret.png"]
    write_crafted_index(tmp_path / "idx", encoder, posterior, source, paths)
    dirs = [shard_dirs[0], tmp_path / "idx"]
    with Searcher.open(dirs, encoder=encoder) as sharded:
        client = TestClient(create_app(dirs, searcher=sharded))
        served = {path: client.get(f"/api/items/{item_id}/thumbnail", params={"shard": 1}).status_code
                  for item_id, path in enumerate(paths)}
        assert served == {path: 200 if path == "ok.png" else 404 for path in paths}
        assert all(client.get(f"/api/items/{item_id}/thumbnail", params={"shard": 0}).status_code == 200
                   for item_id in range(len(paths)))  # the same ids in the other shard are its own images
        with_path = client.get("/api/items/1/thumbnail", params={"shard": 1, "path": "ok.png"})
        assert with_path.status_code == 404  # a path in the request is ignored


def test_worker_processes_serve_the_shards_the_environment_lists(shard_dirs, monkeypatch):
    from bayesretrieval.service.app import SERVE_CONFIG_ENV, app_from_environment

    monkeypatch.setenv(SERVE_CONFIG_ENV, json.dumps({"index_dir": [str(d) for d in shard_dirs]}))
    with TestClient(app_from_environment()) as client:
        version = client.get("/api/version").json()
    assert [s["item_count"] for s in version["shards"]] == list(map(len, SHARD_NAMES))


def test_the_real_server_serves_several_directories_over_loopback(shard_dirs):
    with running_server(shard_dirs) as served:
        status, answer = http(f"{served.base}/api/search", {"queries": ["a red circle"], "k": 10})
        rows = answer["queries"][0]["results"]
        assert status == 200 and answer["version"] == ["v000001", "v000001"] and {r["shard"] for r in rows} == {0, 1}
        last = rows[-1]
        _, item = http(f"{served.base}/api/items/{last['item_id']}?shard={last['shard']}")
        assert item["path"] == last["path"]
        with urllib.request.urlopen(served.base + item["thumbnail"], timeout=30) as response:
            assert response.status == 200 and response.headers["content-type"] == "image/jpeg"
        _, version = http(f"{served.base}/api/version")
        assert [s["item_count"] for s in version["shards"]] == list(map(len, SHARD_NAMES))
    assert f"serving 2 index directories as one collection at {served.base}/ " in served.out
    for shard, index_dir in enumerate(shard_dirs):
        assert f"shard {shard}: {index_dir} (index version v000001, {len(SHARD_NAMES[shard])} items)" in served.out
    assert "Traceback" not in served.err and '"GET /api/items/' in served.err
