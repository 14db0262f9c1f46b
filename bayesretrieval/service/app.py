"""The FastAPI application: search, items, thumbnails, audit, health and version over one index.

Usage::

    app = create_app("demo-output/index")          # then: uvicorn.run(app)
    app = create_app(["index-2023", "index-2024"])  # several index directories, searched as one collection

One searcher per process (a :class:`~bayesretrieval.queries.Searcher`, or a
:class:`~bayesretrieval.queries.ShardedSearcher` over several directories), opened with
``auto_refresh=True``: a request that arrives after a build published a new version
moves it (each shard on its own) there, and searches already running finish on the
version they started with. The app reads both kinds of searcher alike: a snapshot's
``readers`` are its shards, one for a single index. An item is named by its id and,
when several directories are served, its ``shard`` (the directory's position), never by
a path. Endpoints are plain functions, so FastAPI runs them in its thread pool.
"""

import contextlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional, Sequence

from bayesretrieval import __version__
from bayesretrieval.options import (
    DEFAULT_MAX_PIXELS,
    HIGH_UNCERTAINTY_PERCENTILE,
    MAX_QUERIES_PER_REQUEST,
    MAX_QUERY_CHARS,
    MAX_RESULTS_PER_QUERY,
    MAX_UPLOAD_BYTES,
    AuditScore,
    ScoreName,
)
from bayesretrieval.service.items import StatsCache, items_router
from bayesretrieval.service.schemas import service_schemas
from bayesretrieval.service.security import token_matches

logger = logging.getLogger("bayesretrieval.service")

IMAGE_SEARCH_PATH = "/api/search/image"
STATIC_DIR = Path(__file__).with_name("static")
"""The page's HTML, CSS and JavaScript, served as they are."""
SERVE_CONFIG_ENV = "BAYESRETRIEVAL_SERVE_CONFIG"
"""JSON options of :func:`app_from_environment` (``bayesretrieval serve --workers N`` sets it for its workers)."""


@dataclass(frozen=True)
class ServiceLimits:
    """Request limits beyond the ones the JSON schema states.

    Attributes:
        max_upload_bytes: largest image upload.
        max_pixels: largest decoded width x height (the build-index decompression-bomb limit).
        max_body_bytes: largest request body other than an image upload.
        thumbnail_px: default thumbnail side; ``max_thumbnail_px`` the largest a request may ask.
    """

    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_body_bytes: int = 2**20
    thumbnail_px: int = 256
    max_thumbnail_px: int = 512


def create_app(index_dir: str | Path | Sequence[str | Path], token: str | None = None, *,
               cors_origins: Sequence[str] = (), limits: ServiceLimits | None = None, searcher=None, **open_options):
    """The service over ``index_dir``: a ``fastapi.FastAPI`` application.

    Args:
        index_dir: an index built by ``bayesretrieval build-index``, or a list of them: the
            shards of one collection (shard ``i`` is ``index_dir[i]``).
        token: when set, every endpoint but ``/api/health`` requires ``Authorization: Bearer <token>``.
        cors_origins: origins allowed to call the API from a browser (none: no CORS headers).
        limits: request limits.
        searcher: an already opened searcher or sharded searcher, left open at shutdown (default:
            ``Searcher.open(index_dir, auto_refresh=True)``, closed at shutdown).
        **open_options: passed to :meth:`Searcher.open` (``device``, ``torch_threads``, ...).

    Raises:
        FileNotFoundError: if there is no index at ``index_dir``.
        ValueError: if the index cannot be served (model or posterior mismatch, or shards that differ in them).
    """
    from fastapi import Depends, FastAPI
    from fastapi.middleware.cors import CORSMiddleware

    from bayesretrieval.queries import Searcher

    schemas = service_schemas()
    limits = limits or ServiceLimits()
    owned = searcher is None
    if owned:
        searcher = Searcher.open(index_dir, auto_refresh=True, **open_options)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        if owned:
            searcher.close()

    app = FastAPI(title="bayesretrieval", version=__version__, lifespan=lifespan,
                  description="Uncertainty-aware image search over one bayesretrieval index, or several searched as "
                              "one collection (shards): every result has an expected cosine and its std under the "
                              "Laplace posterior.",
                  responses={400: {"model": schemas.ErrorResponse}, 401: {"model": schemas.ErrorResponse}})
    app.state.searcher, app.state.limits = searcher, limits
    stats = StatsCache(searcher.form)
    guard = [Depends(_token_dependency(token))] if token is not None else []
    app.include_router(_health_router())
    _add_page(app)
    app.include_router(_api_router(searcher, limits, stats), dependencies=guard)
    app.include_router(items_router(searcher, limits, stats), dependencies=guard)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(AccessLog, limits=limits)
    return app


def app_from_environment():
    """The app ``$BAYESRETRIEVAL_SERVE_CONFIG`` describes: the factory each uvicorn worker process calls.

    The JSON holds ``index_dir`` (a path, or a list of them: the shards) and optionally
    ``token_file``, ``cors_origins``, ``device`` and ``torch_threads``; the token itself
    is read here (from the file or ``$BAYESRETRIEVAL_TOKEN``), never passed through the
    environment by the command. Workers share nothing but the index directories: each
    opens its own searcher.

    Raises:
        KeyError: if the variable is not set.
    """
    import json

    from bayesretrieval.service.security import read_token

    config = json.loads(os.environ[SERVE_CONFIG_ENV])
    service_logger = logging.getLogger("bayesretrieval.service")
    if not logging.getLogger().handlers and not service_logger.handlers:  # a fresh worker process
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        service_logger.addHandler(handler)
    service_logger.setLevel(logging.INFO)
    return create_app(config["index_dir"], read_token(config.get("token_file")),
                      cors_origins=config.get("cors_origins") or (), device=config.get("device", "cpu"),
                      torch_threads=config.get("torch_threads"))


def _token_dependency(token: str):
    from fastapi import Depends, HTTPException, Request
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

    bearer = HTTPBearer(auto_error=False, description="the API token given to `bayesretrieval serve`")

    def require_token(request: Request, _credentials: Annotated[Optional[HTTPAuthorizationCredentials],
                                                                 Depends(bearer)] = None) -> None:
        if not token_matches(request.headers.get("authorization"), token):
            raise HTTPException(401, "missing or wrong API token: send 'Authorization: Bearer TOKEN'",
                                headers={"WWW-Authenticate": "Bearer"})

    return require_token


def _add_page(app) -> None:
    """The search page at ``/`` and its static files (no token: they hold no data; the page asks for one)."""
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def _health_router():
    from fastapi import APIRouter

    schemas = service_schemas()
    router = APIRouter(prefix="/api", tags=["service"])

    @router.get("/health", response_model=schemas.HealthResponse)
    def health() -> dict:
        """Liveness: answers without a token."""
        return {"status": "ok"}

    return router


def _api_router(searcher, limits: ServiceLimits, stats: StatsCache):
    from fastapi import APIRouter, File, Form, Query, UploadFile

    schemas = service_schemas()
    router = APIRouter(prefix="/api")

    @router.post("/search", response_model=schemas.SearchResponse, response_model_exclude_unset=True, tags=["search"])
    def search(request: schemas.SearchRequest) -> dict:
        """Text search with the parameters of ``Searcher.search``.

        Over several index directories every shard is searched and each query keeps its best
        ``k`` over all of them; each result then names its ``shard``.
        """
        queries = [request.queries] if isinstance(request.queries, str) else list(request.queries)
        return run_search(searcher, queries, queries, request, stats)

    @router.post(IMAGE_SEARCH_PATH.removeprefix("/api"), response_model=schemas.SearchResponse,
                 response_model_exclude_unset=True, tags=["search"])
    def search_image(
        image: Annotated[UploadFile, File(description="one image file (decoded with build-index's limits)")],
        k: Annotated[int, Form(ge=1, le=MAX_RESULTS_PER_QUERY)] = 10,
        score: Annotated[ScoreName, Form()] = ScoreName.EXPECTED,
        kappa: Annotated[float, Form(ge=0.0, le=100.0)] = 1.0,
        threshold: Annotated[Optional[float], Form(ge=0.0, le=1.0)] = None,
        path_prefix: Annotated[Optional[str], Form(max_length=MAX_QUERY_CHARS)] = None,
    ) -> dict:
        """Find images like an uploaded one (over every shard, as a text search)."""
        options = schemas.SearchOptions(k=k, score=score, kappa=kappa, threshold=threshold, path_prefix=path_prefix)
        picture = decode_upload(image, limits)
        label = (image.filename or "upload")[:MAX_QUERY_CHARS]
        picture.filename = label
        return run_search(searcher, picture, [label], options, stats)

    @router.get("/audit", response_model=schemas.AuditResponse, response_model_exclude_unset=True, tags=["items"])
    def audit(k: Annotated[int, Query(ge=1, le=MAX_RESULTS_PER_QUERY)] = 50,
              by: Optional[AuditScore] = None) -> dict:
        """The items the posterior is least sure of over every shard, most uncertain first."""
        with _bad_request():
            frame = searcher.audit(k, by.value if by is not None else None)
        return {**{key: frame.attrs[key] for key in ("version", "form", "by", "item_count")},
                "items": frame.to_dict("records")}

    @router.get("/version", response_model=schemas.VersionResponse, tags=["service"])
    def version() -> dict:
        """The library, the index versions being served (one per shard) and their sizes."""
        snapshot = searcher.snapshot()
        readers = snapshot.readers
        shards = [{"shard": shard, "index_version": reader.manifest.version, "created_at": reader.manifest.created_at,
                   "item_count": len(reader)} for shard, reader in enumerate(readers)]
        return {"library_version": __version__, "index_version": snapshot.version,
                "created_at": max(shard["created_at"] for shard in shards),
                "item_count": sum(shard["item_count"] for shard in shards), "shards": shards,
                "embed_dim": readers[0].embed_dim, "model": readers[0].manifest.model,
                "estimator": searcher.estimator.value, "form": searcher.form.value,
                "scores": [s.value for s in ScoreName],
                "calibrated": {m: searcher.calibration(m) is not None for m in ("text", "image")},
                "high_uncertainty": high_uncertainty(stats.get(readers)),
                "limits": {"max_query_chars": MAX_QUERY_CHARS, "max_results_per_query": MAX_RESULTS_PER_QUERY,
                           "max_queries_per_request": MAX_QUERIES_PER_REQUEST,
                           "max_upload_bytes": limits.max_upload_bytes, "max_pixels": limits.max_pixels}}

    return router


@contextlib.contextmanager
def _bad_request():
    """Turn the library's argument errors into 400s (a damaged index stays a 500)."""
    from fastapi import HTTPException

    from bayesretrieval.store.reader import IndexDamagedError

    try:
        yield
    except IndexDamagedError:
        raise
    except ValueError as err:
        raise HTTPException(400, str(err)) from None


def high_uncertainty(stats) -> dict:
    """The fixed threshold of the high-uncertainty mark on ``stats``' version (``/api/version``)."""
    return {"by": stats.by.value, "percentile": HIGH_UNCERTAINTY_PERCENTILE,
            "threshold": _json_number(stats.threshold(HIGH_UNCERTAINTY_PERCENTILE))}


def run_search(searcher, queries, labels: list[str], options, stats: StatsCache) -> dict:
    """Search with ``options`` (a ``SearchOptions`` model) and shape the answer as a ``SearchResponse``.

    Each result also gets its item's audit percentile and the high-uncertainty mark,
    read from the versions the searcher holds once the search is done (a result without
    a ``shard`` column comes from the one shard, 0).
    """
    from bayesretrieval.queries import ItemFilter

    where = ItemFilter(path_prefix=options.path_prefix) if options.path_prefix else None
    start = time.perf_counter()
    with _bad_request():
        frame = searcher.search(queries, k=options.k, score=options.score.value, kappa=options.kappa,
                                threshold=options.threshold, where=where)
    seconds = time.perf_counter() - start
    rows = [{key: _json_number(value) for key, value in row.items()} for row in frame.to_dict("records")]
    readers = searcher.snapshot().readers
    marks = stats.get(readers).marks(readers, frame.get("shard", 0), frame["item_id"], HIGH_UNCERTAINTY_PERCENTILE)
    for row, (percentile, high) in zip(rows, marks):
        row["item_percentile"], row["high_uncertainty"] = percentile, high
    grouped: list[list] = [[] for _ in labels]
    for row in rows:
        grouped[int(row["query_index"])].append(row)
    attrs = frame.attrs
    percentiles = [_json_number(p) for p in attrs["query_percentile"]]
    return {"version": attrs["version"], "score": attrs["score"], "estimator": attrs["estimator"],
            "exact": attrs["exact"], "certified": attrs["certified"],
            "shared_projection": bool(attrs.get("shared_projection", False)),
            "calibrated": any(row["probability"] is not None for row in rows),
            "seconds": seconds, "timings": attrs["seconds"],
            "queries": [{"query": str(label), "query_index": i, "query_warning": attrs["query_warning"][i],
                         "query_percentile": percentiles[i], "results": grouped[i]}
                        for i, label in enumerate(labels)]}


def _json_number(value):
    """``value`` with NaN and infinities as ``None`` (JSON has no such numbers)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def decode_upload(upload, limits: ServiceLimits):
    """The uploaded image (a FastAPI ``UploadFile``), decoded by build-index's decoder within ``limits``.

    Raises:
        HTTPException: 413 for a file or image over the limits, 400 for one that does not decode.
    """
    from fastapi import HTTPException

    from bayesretrieval.indexing.decode import ImageSkipped, decode_image
    from bayesretrieval.skips import SkipReason

    data = upload.file.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise HTTPException(413, f"the upload is over {limits.max_upload_bytes} bytes")
    with tempfile.TemporaryDirectory(prefix="bayesretrieval-upload-") as folder:
        path = Path(folder) / "upload"
        path.write_bytes(data)
        try:
            return decode_image(path, max_pixels=limits.max_pixels)
        except ImageSkipped as err:
            if err.reason is SkipReason.TOO_LARGE:
                raise HTTPException(413, f"the image has more than {limits.max_pixels} pixels") from None
            raise HTTPException(400, f"the upload is not a readable image ({err.reason.value})") from None


class AccessLog:
    """ASGI middleware: one log line per request with its latency; body-size limits; 500s without details.

    A request whose ``Content-Length`` is over the limit is refused with 413 before its
    body is read. An exception no handler turned into a response is logged with its
    traceback here and answered with ``{"detail": "internal server error"}``.
    """

    def __init__(self, app, limits: ServiceLimits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        """Serve one ASGI connection scope."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send_logged)
            else:
                await self.app(scope, receive, send_logged)
        except Exception:
            logger.exception("%s %s failed", scope["method"], scope["path"])
            if status[0]:
                raise  # the response has started: the server closes the connection
            from fastapi.responses import JSONResponse

            await JSONResponse({"detail": "internal server error"}, status_code=500)(scope, receive, send_logged)
        finally:
            client = scope.get("client") or ("-", 0)
            logger.info('%s "%s %s" %s %.1f ms', client[0], scope["method"], scope["path"], status[0] or 500,
                        1000 * (time.perf_counter() - start))

    def _refusal(self, scope):
        from fastapi.responses import JSONResponse

        headers = dict(scope.get("headers") or [])
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            return JSONResponse({"detail": "bad Content-Length header"}, status_code=400)
        limit = (self.limits.max_upload_bytes + 2**16 if scope["path"] == IMAGE_SEARCH_PATH
                 else self.limits.max_body_bytes)
        if length > limit:
            return JSONResponse({"detail": f"request body of {length} bytes is over the limit of {limit}"},
                                status_code=413)
        return None
