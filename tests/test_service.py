"""The HTTP service through FastAPI's test client and over loopback HTTP.

Every endpoint on real indexes, the limits, tokens, refresh, and thumbnails that never
leave the indexed folder.
"""

import io
import json
import sys
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import _png_header_only, write_images
from PIL import Image
from servers import build, http, running_server

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="the test extra lacks httpx")

from fastapi.testclient import TestClient  # noqa: E402

from bayesretrieval.cli import main  # noqa: E402
from bayesretrieval.indexing import BuildConfig, build_index  # noqa: E402
from bayesretrieval.indexing.scalars import ScalarComputer  # noqa: E402
from bayesretrieval.options import MAX_UPLOAD_BYTES, SERVE_TOKEN_ENV  # noqa: E402
from bayesretrieval.queries import ItemFilter, Searcher  # noqa: E402
from bayesretrieval.queries.audit import audit_index  # noqa: E402
from bayesretrieval.queries.searcher import RESULT_COLUMNS  # noqa: E402
from bayesretrieval.service.app import ServiceLimits, create_app  # noqa: E402
from bayesretrieval.service.security import check_exposure, is_loopback, read_token  # noqa: E402
from bayesretrieval.store import ItemArrays, VarianceSpec, VersionInfo, write_version  # noqa: E402
from bayesretrieval.store.format import SKIPPED_SCHEMA  # noqa: E402

D = 64
TOKEN = "s3cret-token-for-tests-0123456789"
NAMES = [f"{folder}/img{i}.png" for folder in ("cats", "dogs") for i in range(4)]


@pytest.fixture(scope="module")
def index(tmp_path_factory, encoder, posterior):
    root = tmp_path_factory.mktemp("served")
    write_images(root / "img", NAMES)
    build(root / "img", root / "idx", encoder, posterior)
    return root / "idx"


@pytest.fixture(scope="module")
def searcher(index, encoder):
    with Searcher.open(index, encoder=encoder, auto_refresh=True) as opened:
        yield opened


@pytest.fixture(scope="module")
def client(index, searcher):
    return TestClient(create_app(index, searcher=searcher))


def assert_json_error(response, status):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert "detail" in response.json() and "Traceback" not in response.text
    return response.json()["detail"]


def test_text_search_answers_as_the_python_api(client, searcher):
    body = {"queries": ["a red circle", "a dog"], "k": 3, "score": "lcb", "kappa": 0.5}
    response = client.post("/api/search", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    expected = searcher.search(["a red circle", "a dog"], k=3, score="lcb", kappa=0.5)
    assert answer["version"] == expected.attrs["version"] == "v000001"
    assert answer["score"] == "lcb" and answer["exact"] is True and answer["calibrated"] is False
    assert answer["seconds"] > 0 and set(answer["timings"]) >= {"queries", "faiss", "rerank", "table"}
    assert [q["query"] for q in answer["queries"]] == ["a red circle", "a dog"]
    rows = [row for q in answer["queries"] for row in q["results"]]
    assert all(list(row) == [*RESULT_COLUMNS, "item_percentile", "high_uncertainty"] for row in rows)
    assert [r["item_id"] for r in rows] == expected.item_id.tolist()
    assert [r["path"] for r in rows] == expected.path.tolist()
    np.testing.assert_allclose([r["cosine_mean"] for r in rows], expected.cosine_mean, rtol=1e-12)
    np.testing.assert_allclose([r["cosine_std"] for r in rows], expected.cosine_std, rtol=1e-12)
    assert all(r["probability"] is None for r in rows)
    assert [q["query_warning"] for q in answer["queries"]] == expected.attrs["query_warning"]
    assert all("query_percentile" in q for q in answer["queries"])


def test_results_marked_uncertain_are_the_collections_least_certain_tenth(tmp_path, encoder, posterior):
    write_images(tmp_path / "img", [f"img{i:02d}.png" for i in range(20)], seed=3)
    build(tmp_path / "img", tmp_path / "idx", encoder, posterior)
    with Searcher.open(tmp_path / "idx", encoder=encoder) as searcher:
        client = TestClient(create_app(tmp_path / "idx", searcher=searcher))
        audit = searcher.audit(None).set_index("item_id")
        answer = client.post("/api/search", json={"queries": "a red circle", "k": 20}).json()
        mark = client.get("/api/version").json()["high_uncertainty"]
    rows = answer["queries"][0]["results"]
    ids = [r["item_id"] for r in rows]
    np.testing.assert_allclose([r["item_percentile"] for r in rows], audit.percentile[ids])
    ranking = audit[mark["by"]].to_numpy()
    share_below = (ranking[None, :] < ranking[:, None]).mean(axis=1)
    expected = pd.Series(share_below >= 0.9, index=audit.index)
    assert [r["high_uncertainty"] for r in rows] == expected[ids].tolist()
    assert sum(r["high_uncertainty"] for r in rows) == 2  # 19/20 and 18/20 of the collection below them
    assert mark["percentile"] == 90.0 and mark["by"] == audit.attrs["by"]
    assert (ranking > mark["threshold"]).sum() == 2


def test_one_query_as_a_string_and_a_path_prefix_filter(client, searcher):
    answer = client.post("/api/search", json={"queries": "a cat", "k": 10, "path_prefix": "dogs/"}).json()
    results = answer["queries"][0]["results"]
    expected = searcher.search("a cat", k=10, where=ItemFilter(path_prefix="dogs/"))
    assert len(results) == 4 and all(r["path"].startswith("dogs/") for r in results)
    assert [r["item_id"] for r in results] == expected.item_id.tolist()
    assert [r["rank"] for r in results] == [1, 2, 3, 4]


def test_probability_without_a_calibration_is_a_400(client):
    detail = assert_json_error(client.post("/api/search", json={"queries": ["x"], "score": "probability"}), 400)
    assert "calibrat" in detail
    assert "calibrat" in assert_json_error(client.post("/api/search", json={"queries": "x", "threshold": 0.5}), 400)


def test_image_search_by_upload_finds_the_same_image_first(client, index, searcher):
    source = index.parent / "img" / NAMES[5]
    response = client.post("/api/search/image", files={"image": ("query.png", source.read_bytes(), "image/png")},
                           data={"k": "3", "score": "expected"})
    assert response.status_code == 200, response.text
    query = response.json()["queries"][0]
    assert query["query"] == "query.png" and len(query["results"]) == 3
    assert query["results"][0]["path"] == NAMES[5]
    with Image.open(source) as image:
        expected = searcher.search(image.convert("RGB"), k=3)
    assert [r["item_id"] for r in query["results"]] == expected.item_id.tolist()


def test_item_metadata_and_its_uncertainty(client, index, searcher):
    audit = audit_index(searcher.reader)
    row = audit.iloc[2]
    answer = client.get(f"/api/items/{row.item_id}").json()
    with Image.open(index.parent / "img" / row.path) as image:
        assert (answer["width"], answer["height"]) == image.size
    assert answer["path"] == row.path and answer["file_size"] == (index.parent / "img" / row.path).stat().st_size
    assert answer["uncertainty"] == pytest.approx(row.uncertainty, rel=1e-12)
    assert answer["cosine_std"] == pytest.approx(row.cosine_std, rel=1e-12)
    assert answer["percentile"] == pytest.approx(row.percentile)
    assert answer["scalars"]["scale"] == pytest.approx(row.scale, rel=1e-12)
    assert answer["thumbnail"] == f"/api/items/{row.item_id}/thumbnail" and answer["version"] == "v000001"
    assert "no item 999" in assert_json_error(client.get("/api/items/999"), 404)
    assert_json_error(client.get("/api/items/abc"), 422)


def test_thumbnails_are_small_images_of_the_item(client, searcher):
    item_id = int(searcher.reader.item_ids[0])
    response = client.get(f"/api/items/{item_id}/thumbnail", params={"size": 32})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(response.content)) as image:
        assert max(image.size) == 32
    assert_json_error(client.get(f"/api/items/{item_id}/thumbnail", params={"size": 10_000}), 422)


def test_audit_lists_the_least_certain_items(client, searcher):
    answer = client.get("/api/audit", params={"k": 3}).json()
    expected = audit_index(searcher.reader, 3)
    assert [r["item_id"] for r in answer["items"]] == expected.item_id.tolist()
    assert answer["item_count"] == len(NAMES) and answer["by"] == expected.attrs["by"]
    assert [r["rank"] for r in answer["items"]] == [1, 2, 3]
    assert_json_error(client.get("/api/audit", params={"k": 0}), 422)
    assert_json_error(client.get("/api/audit", params={"k": 1001}), 422)


def test_health_version_and_openapi(client):
    assert client.get("/api/health").json() == {"status": "ok"}
    version = client.get("/api/version").json()
    assert version["index_version"] == "v000001" and version["item_count"] == len(NAMES)
    assert version["calibrated"] == {"text": False, "image": False} and "probability" in version["scores"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/search", "/api/search/image", "/api/items/{item_id}", "/api/items/{item_id}/thumbnail",
            "/api/audit", "/api/health", "/api/version"} <= set(paths)
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("body", [
    {"queries": "x" * 1001},
    {"queries": ["ok"] * 65},
    {"queries": []},
    {"queries": [""]},
    {"queries": "x", "k": 1001},
    {"queries": "x", "k": 0},
    {"queries": "x", "score": "best"},
    {"queries": "x", "kappa": -1},
    {"queries": "x", "threshold": 2},
    {"k": 3},
])
def test_bad_search_requests_get_a_422(client, body):
    assert_json_error(client.post("/api/search", json=body), 422)


def test_other_bad_requests_get_json_4xx(client):
    assert "empty" in assert_json_error(client.post("/api/search", json={"queries": ["   "]}), 400)
    assert_json_error(client.post("/api/search", content=b"{not json", headers={"content-type": "application/json"}),
                      422)
    assert_json_error(client.post("/api/search", json={"queries": ["x" * 900] * 60, "pad": "y" * 2**20}), 413)
    upload = lambda data: client.post("/api/search/image", files={"image": ("q.png", data, "image/png")})  # noqa: E731
    assert "pixels" in assert_json_error(upload(_png_header_only(60_000, 60_000)), 413)
    assert "not a readable image" in assert_json_error(upload(b"not an image at all"), 400)
    assert_json_error(upload(b"\0" * (MAX_UPLOAD_BYTES + 2**17)), 413)
    assert_json_error(client.post("/api/search/image", data={"k": "3"}), 422)
    assert_json_error(client.get("/api/nothing-here"), 404)


def test_upload_limits_inside_the_handler(index, searcher):
    small = TestClient(create_app(index, searcher=searcher, limits=ServiceLimits(max_upload_bytes=1000,
                                                                                 max_pixels=50 * 50)))
    buffer = io.BytesIO()
    Image.new("RGB", (60, 60), (200, 10, 10)).save(buffer, format="PNG")
    assert "pixels" in assert_json_error(
        small.post("/api/search/image", files={"image": ("q.png", buffer.getvalue(), "image/png")}), 413)
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(noise, "PNG")
    assert len(noise.getvalue()) > 1000
    assert "bytes" in assert_json_error(
        small.post("/api/search/image", files={"image": ("q.png", noise.getvalue(), "image/png")}), 413)


def test_an_unexpected_error_is_a_500_without_details_and_logged(index, searcher, monkeypatch, caplog):
    app = create_app(index, searcher=searcher)
    monkeypatch.setattr(searcher, "search", lambda *a, **k: 1 / 0)
    with caplog.at_level("INFO", logger="bayesretrieval.service"):
        response = TestClient(app).post("/api/search", json={"queries": "x"})
    assert response.status_code == 500 and response.json() == {"detail": "internal server error"}
    assert "ZeroDivisionError" in caplog.text and "ZeroDivisionError" not in response.text
    assert '"POST /api/search" 500' in caplog.text


def test_one_access_log_line_per_request_with_its_latency(client, caplog):
    with caplog.at_level("INFO", logger="bayesretrieval.service"):
        client.get("/api/health")
        client.get("/api/items/999")
    lines = [r.getMessage() for r in caplog.records if r.name == "bayesretrieval.service"]
    assert len(lines) == 2 and lines[0].startswith("testclient")
    assert '"GET /api/health" 200' in lines[0] and lines[0].endswith(" ms")
    assert '"GET /api/items/999" 404' in lines[1]


def test_cors_only_when_asked_for(index, searcher, client):
    preflight = {"Origin": "http://example.org", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/api/search", headers=preflight).headers
    assert "access-control-allow-origin" not in client.get("/api/health", headers={"Origin": "http://example.org"}).headers
    allowed = TestClient(create_app(index, searcher=searcher, cors_origins=["http://example.org"]))
    answer = allowed.options("/api/search", headers=preflight)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "http://example.org"
    other = allowed.options("/api/search", headers={**preflight, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


# Thumbnails never leave the indexed folder.


def write_crafted_index(path, encoder, posterior, source_root, paths):
    """An index over ``source_root`` whose stored paths are ``paths`` (as a tampered or hostile build would hold)."""
    rng = np.random.default_rng(0)
    n = len(paths)
    means, activations = torch.from_numpy(rng.normal(size=(n, D))), torch.from_numpy(rng.normal(size=(n, 64)))
    scalars = ScalarComputer(posterior).from_activations(means, activations).scalars
    unknown = np.full(n, -1)
    items = ItemArrays(np.arange(n), list(paths), unknown, unknown, unknown.astype(np.int32), unknown.astype(np.int32),
                       means.float().numpy(), scalars)
    info = VersionInfo("images", str(source_root), encoder.identity.to_dict(), VarianceSpec(), None, n)
    write_version(path, items, SKIPPED_SCHEMA.empty_table(), posterior, info)


def test_thumbnails_refuse_paths_that_leave_the_indexed_folder(tmp_path, encoder, posterior):
    source, outside = tmp_path / "src", tmp_path / "secret"
    write_images(source, ["ok.png", "sub/inner.png"])
    write_images(outside, ["secret.png"], seed=1)
    (source / "link.png").symlink_to(outside / "secret.png")
    (source / "dirlink").symlink_to(outside, target_is_directory=True)
    (source / "inner-link.png").symlink_to(source / "sub" / "inner.png")
    paths = ["ok.png", "../secret/secret.png", str(outside / "secret.png"), "link.png", "dirlink/secret.png",
             "%2e%2e/secret/secret.png", "sub/../../secret/secret.png", "..%2fsecret%2fsecret.png", "sub/inner.png",
             "inner-link.png", "missing.png", "sub", "sub/../ok.png"]
    write_crafted_index(tmp_path / "idx", encoder, posterior, source, paths)
    searcher = Searcher.open(tmp_path / "idx", encoder=encoder, auto_refresh=True)
    client = TestClient(create_app(tmp_path / "idx", searcher=searcher))
    served = {path: client.get(f"/api/items/{item_id}/thumbnail").status_code for item_id, path in enumerate(paths)}
    inside = {"ok.png", "sub/inner.png", "inner-link.png", "sub/../ok.png"}
    assert served == {path: 200 if path in inside else 404 for path in paths}
    for url in ["/api/items/%2e%2e/thumbnail", "/api/items/..%2F..%2Fsecret%2Fsecret.png/thumbnail",
                "/api/items/%2F%2E%2E%2Fsecret/thumbnail", f"/api/items/{outside / 'secret.png'}/thumbnail",
                "/api/items/-1/thumbnail", "/api/items/1e3/thumbnail", "/api/items/0%00/thumbnail"]:
        response = client.get(url)
        assert response.status_code in (404, 422), url
        assert response.headers["content-type"].startswith("application/json"), url
    with_path = client.get("/api/items/0/thumbnail", params={"path": "../secret/secret.png"})
    assert with_path.content == client.get("/api/items/0/thumbnail").content  # a path in the request is ignored
    searcher.close()


def test_an_index_of_embeddings_has_no_thumbnails(tmp_path, encoder, posterior):
    write_crafted_index(tmp_path / "idx", encoder, posterior, tmp_path, ["0", "1"])
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["source_kind"] == "images"  # the crafted index claims images; its paths name no file
    with Searcher.open(tmp_path / "idx", encoder=encoder) as searcher:
        client = TestClient(create_app(tmp_path / "idx", searcher=searcher))
        assert_json_error(client.get("/api/items/0/thumbnail"), 404)


# Tokens and binding.


def test_the_page_and_its_static_files_are_served_without_a_token(index, searcher):
    client = TestClient(create_app(index, TOKEN, searcher=searcher))
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset, kind in (("static/app.js", "javascript"), ("static/style.css", "text/css")):
        assert f'"{asset}"' in page.text
        response = client.get(f"/{asset}")
        assert response.status_code == 200 and kind in response.headers["content-type"] and response.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN: works offline
    assert client.get("/static/../app.py").status_code == 404
    assert client.get("/api/version").status_code == 401


def test_a_token_guards_every_endpoint_but_health(index, searcher):
    client = TestClient(create_app(index, token=TOKEN, searcher=searcher))
    for method, url, kwargs in [("get", "/api/version", {}), ("post", "/api/search", {"json": {"queries": "x"}}),
                                ("get", "/api/items/0", {}), ("get", "/api/items/0/thumbnail", {}),
                                ("get", "/api/audit", {})]:
        call = getattr(client, method)
        assert "token" in assert_json_error(call(url, **kwargs), 401)
        assert call(url, headers={"Authorization": "Bearer wrong"}, **kwargs).status_code == 401
        assert call(url, headers={"Authorization": TOKEN}, **kwargs).status_code == 401
        assert call(url, headers={"Authorization": f"Bearer {TOKEN}x"}, **kwargs).status_code == 401
        assert call(url, headers={"Authorization": f"Bearer {TOKEN}"}, **kwargs).status_code == 200, url
    assert client.get("/api/health").status_code == 200
    assert client.get("/api/version").headers["www-authenticate"] == "Bearer"


def test_binding_rules():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.4", "example.org"))
    check_exposure("127.0.0.1", None)
    check_exposure("0.0.0.0", TOKEN)
    with pytest.raises(ValueError, match="refusing to listen on '0.0.0.0' without an API token"):
        check_exposure("0.0.0.0", None)


def test_tokens_come_from_a_file_or_the_environment(tmp_path):
    assert read_token(None, {}) is None
    assert read_token(None, {SERVE_TOKEN_ENV: f" {TOKEN}\n"}) == TOKEN
    (tmp_path / "token").write_text(f"{TOKEN}\nignored\n")
    assert read_token(tmp_path / "token", {SERVE_TOKEN_ENV: "other-token-from-the-env-0000"}) == TOKEN
    with pytest.raises(ValueError, match="at least 16"):
        read_token(None, {SERVE_TOKEN_ENV: "short"})
    (tmp_path / "empty").write_text("")
    with pytest.raises(ValueError, match="0 characters"):
        read_token(tmp_path / "empty", {})
    with pytest.raises(ValueError, match="cannot read the token file"):
        read_token(tmp_path / "absent", {})


def test_serve_refuses_to_start_on_a_public_address_without_a_token(index, monkeypatch, capsys):
    monkeypatch.delenv(SERVE_TOKEN_ENV, raising=False)
    assert main(["serve", str(index), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "serve: error: refusing to listen on '0.0.0.0' without an API token" in err and "--token-file" in err
    monkeypatch.setenv(SERVE_TOKEN_ENV, "short")
    assert main(["serve", str(index), "--host", "0.0.0.0"]) == 2
    assert "at least 16" in capsys.readouterr().err
    assert main(["serve", str(index.parent / "nope")]) == 2
    assert "index directory not found" in capsys.readouterr().err


def test_serve_without_the_extra_says_how_to_install_it(index, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve", str(index)]) == 2
    assert "pip install 'bayesretrieval[serve]'" in capsys.readouterr().err


# Refresh.


def test_a_new_version_is_served_to_the_next_request(tmp_path, encoder, posterior):
    write_images(tmp_path / "img", ["a.png", "b.png"])
    build(tmp_path / "img", tmp_path / "idx", encoder, posterior)
    with Searcher.open(tmp_path / "idx", encoder=encoder, auto_refresh=True) as searcher:
        client = TestClient(create_app(tmp_path / "idx", searcher=searcher))
        assert client.get("/api/version").json()["item_count"] == 2
        before = client.post("/api/search", json={"queries": "x", "k": 5}).json()
        assert before["version"] == "v000001" and len(before["queries"][0]["results"]) == 2
        write_images(tmp_path / "img", ["c.png"], seed=7)
        build(tmp_path / "img", tmp_path / "idx", encoder, posterior)
        after = client.post("/api/search", json={"queries": "x", "k": 5}).json()
        assert after["version"] == "v000002" and len(after["queries"][0]["results"]) == 3
        version = client.get("/api/version").json()
        assert (version["index_version"], version["item_count"]) == ("v000002", 3)
        new_id = next(r["item_id"] for r in after["queries"][0]["results"] if r["path"] == "c.png")
        assert client.get(f"/api/items/{new_id}").json()["version"] == "v000002"
        assert client.get(f"/api/items/{new_id}/thumbnail").status_code == 200
        assert client.get("/api/audit", params={"k": 10}).json()["item_count"] == 3


# The real server over loopback HTTP.


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2: about 30 s on 2 cores
def test_the_real_server_answers_over_loopback(index, workers):
    with running_server(index, "--workers", str(workers)) as served:
        status, answer = http(f"{served.base}/api/search", {"queries": ["a red circle"], "k": 2, "score": "lcb"})
        assert status == 200 and answer["version"] == "v000001" and len(answer["queries"][0]["results"]) == 2
        with pytest.raises(urllib.error.HTTPError) as refused:
            http(f"{served.base}/api/search", {"queries": "x", "k": 5000})
        assert refused.value.code == 422 and "detail" in json.loads(refused.value.read())
    assert f"at {served.base}/ " in served.out and "index version v000001, 8 items" in served.out
    assert ("2 worker processes" in served.out) == (workers == 2)
    err = served.err
    assert '"POST /api/search" 200' in err and '"POST /api/search" 422' in err and " ms" in err
    assert "Traceback" not in err


def test_numbers_json_cannot_hold_are_null(index, searcher, monkeypatch):
    search = searcher.search

    def with_undefined_parts(*args, **kwargs):
        frame = search(*args, **kwargs)
        frame["cosine_std_query"], frame["cosine_std_item"] = float("nan"), float("inf")
        return frame

    monkeypatch.setattr(searcher, "search", with_undefined_parts)
    response = TestClient(create_app(index, searcher=searcher)).post("/api/search", json={"queries": "x", "k": 2})
    assert response.status_code == 200, response.text
    rows = response.json()["queries"][0]["results"]
    assert len(rows) == 2 and all(r["cosine_std_query"] is None and r["cosine_std_item"] is None for r in rows)
    assert all(isinstance(r["cosine_std"], float) for r in rows)


def test_worker_processes_build_the_app_from_the_environment(index, tmp_path, monkeypatch):
    from bayesretrieval.service.app import SERVE_CONFIG_ENV, app_from_environment

    (tmp_path / "token").write_text(TOKEN)
    config = {"index_dir": str(index), "token_file": str(tmp_path / "token"), "torch_threads": None}
    monkeypatch.setenv(SERVE_CONFIG_ENV, json.dumps(config))
    with TestClient(app_from_environment()) as client:
        assert client.get("/api/version").status_code == 401
        answer = client.get("/api/version", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert (answer["index_version"], answer["item_count"]) == ("v000001", len(NAMES))


def test_an_indexed_image_finds_itself_with_certainty_on_an_index_with_activations(tmp_path, encoder, posterior):
    write_images(tmp_path / "img", NAMES[:4])
    build_index(tmp_path / "img", tmp_path / "idx", encoder, posterior,
                BuildConfig(batch_size=4, workers=0, store_activations=True))
    with Searcher.open(tmp_path / "idx", encoder=encoder) as searcher:
        client = TestClient(create_app(tmp_path / "idx", searcher=searcher))
        upload = (tmp_path / "img" / NAMES[1]).read_bytes()
        answer = client.post("/api/search/image", files={"image": ("q.png", upload, "image/png")}).json()
    top = answer["queries"][0]["results"][0]
    assert answer["shared_projection"] is True and answer["exact"] is False
    assert top["path"] == NAMES[1] and top["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert top["cosine_std"] == pytest.approx(0.0, abs=1e-3)
    assert top["cosine_std_query"] is None and top["cosine_std_item"] is None
