"""The JSON the service takes and returns (pydantic models; FastAPI builds the OpenAPI schema from them).

The models are built on first use by :func:`service_schemas`, so that importing this
module does not need pydantic (it comes with the ``serve`` extra).
"""

import functools
from types import SimpleNamespace
from typing import Annotated, Optional, Union


@functools.cache
def service_schemas() -> SimpleNamespace:
    """The pydantic models of requests and responses, by class name (built once)."""
    from pydantic import BaseModel, Field

    from bayesretrieval.options import MAX_QUERIES_PER_REQUEST, MAX_QUERY_CHARS, MAX_RESULTS_PER_QUERY, ScoreName

    QueryText = Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS)]
    QueryList = Annotated[list[QueryText], Field(min_length=1, max_length=MAX_QUERIES_PER_REQUEST)]

    class SearchOptions(BaseModel):
        """The parameters of :meth:`~bayesretrieval.queries.Searcher.search` a request may set."""

        k: int = Field(10, ge=1, le=MAX_RESULTS_PER_QUERY, description="results per query")
        score: ScoreName = Field(ScoreName.EXPECTED, description="ranking score (probability needs a calibration)")
        kappa: float = Field(1.0, ge=0.0, le=100.0, description="std multiplier of lcb / ucb / lcb_item")
        threshold: Optional[float] = Field(None, ge=0.0, le=1.0, description="keep results whose calibrated "
                                                                             "match probability is at least this")
        path_prefix: Optional[str] = Field(None, max_length=MAX_QUERY_CHARS,
                                           description="only items whose path (relative to the indexed folder) "
                                                       "starts with this")

    class SearchRequest(SearchOptions):
        """A text search: one query or several (each is searched on its own)."""

        queries: Union[QueryText, QueryList] = Field(
            description=f"a query text or a list of at most {MAX_QUERIES_PER_REQUEST}", examples=["a red circle"])

    Versions = Union[str, list[str]]
    """An index version, or one per shard when several index directories are served."""
    SHARD_DESCRIPTION = ("the item's index directory: its position among those served (only when several are; "
                         "the item routes take it as ?shard=)")

    class ResultRow(BaseModel):
        """One result: the columns of :data:`bayesretrieval.queries.searcher.RESULT_COLUMNS`.

        Over several index directories also ``shard``
        (:data:`bayesretrieval.queries.sharded.SHARDED_RESULT_COLUMNS`). A number JSON
        cannot hold (NaN: no calibration, or a std split that is undefined) is null.
        """

        query: str
        query_index: int
        rank: int
        item_id: int
        shard: Optional[int] = Field(None, description=SHARD_DESCRIPTION)
        path: str
        score: float
        cosine_mean: float
        cosine_std: float
        cosine_std_query: Optional[float]
        cosine_std_item: Optional[float]
        logit_mean: float
        logit_std: float
        probability: Optional[float] = Field(description="calibrated match probability; null without a calibration")
        best_match_probability: float = Field(description="probit softmax over the query's k results: the chance "
                                                           "this one is the match among them")
        exact: bool
        item_percentile: Optional[float] = Field(description="percent of the collection at or below this item on "
                                                             "the audit's ranking score (null: item since removed)")
        high_uncertainty: Optional[bool] = Field(description="the item is less certain than the fixed share of the "
                                                             "collection /api/version names (high_uncertainty)")

    class QueryResults(BaseModel):
        """The results of one query, best first."""

        query: str
        query_index: int
        query_warning: Optional[str] = Field(description="set when the query is more uncertain than the posterior's "
                                                         "fitting inputs usually are: trust its scores less")
        query_percentile: Optional[float] = Field(description="where the query's relative variance falls among the "
                                                              "posterior's fitting inputs (null without a reference)")
        results: list[ResultRow]

    class SearchResponse(BaseModel):
        """The answer to a search."""

        version: Versions = Field(description="the index version that answered (per shard: a list)")
        score: str
        estimator: str
        exact: bool = Field(description="every query's top-k equals a brute-force rerank of the whole collection")
        certified: bool
        shared_projection: bool = Field(False, description="image query on an index with stored activations: "
                                                           "scores account for the projection both images share "
                                                           "(an indexed image finds itself at cosine 1, std 0)")
        calibrated: bool = Field(description="whether the probability column is filled")
        seconds: float = Field(description="time spent in the search, end to end")
        timings: dict[str, float] = Field(description="where the time went (queries, faiss, rerank, table)")
        queries: list[QueryResults]

    class ItemResponse(BaseModel):
        """One indexed item: its file, sizes and per-item uncertainty."""

        version: str = Field(description="the version of the item's shard")
        shard: int = Field(description="the item's shard (0 when one index directory is served)")
        item_id: int
        path: str
        file_size: Optional[int]
        mtime_ns: Optional[int]
        width: Optional[int]
        height: Optional[int]
        scalars: dict[str, float] = Field(description="the stored per-item scalars (docs/math.md section 4)")
        uncertainty: float = Field(description="tr S / |mu|^2: total variance of the embedding over its squared norm")
        cosine_std: float = Field(description="typical std of the item's cosine to a random direction")
        percentile: float = Field(description="percent of the collection (every shard) at or below this item on "
                                              "the audit's ranking score")
        audit_by: str = Field(description="the audit's ranking score (scale or uncertainty)")
        thumbnail: str = Field(description="URL of the item's thumbnail")

    class AuditRow(BaseModel):
        """One row of the audit (:data:`bayesretrieval.queries.audit.AUDIT_COLUMNS`)."""

        rank: int
        shard: Optional[int] = Field(None, description=SHARD_DESCRIPTION)
        item_id: int
        path: str
        uncertainty: float
        percentile: float
        scale: float
        cosine_std: float

    class AuditResponse(BaseModel):
        """The items the posterior is least sure of (over every shard), most uncertain first."""

        version: Versions
        form: str
        by: str
        item_count: int = Field(description="items in the collection (every shard)")
        items: list[AuditRow]

    class HealthResponse(BaseModel):
        """Liveness: the process answers and has an index open."""

        status: str

    class ShardInfo(BaseModel):
        """One served index directory."""

        shard: int = Field(description="its position among the served directories (an item's shard)")
        index_version: str
        created_at: str
        item_count: int

    class VersionResponse(BaseModel):
        """What is being served."""

        library_version: str
        index_version: Versions
        created_at: str = Field(description="when the newest served version was published")
        item_count: int = Field(description="items in the collection (every shard)")
        shards: list[ShardInfo] = Field(description="each served index directory (one unless several are served)")
        embed_dim: int
        model: dict
        estimator: str
        form: str
        scores: list[str]
        calibrated: dict[str, bool] = Field(description="per query modality, whether a calibration exists "
                                                        "(score=probability and threshold need one)")
        high_uncertainty: dict[str, Union[str, float, None]] = Field(
            description="the mark on results: items whose audit score (by) is above threshold, so that at "
                        "least percentile percent of the collection scores lower")
        limits: dict[str, int]

    class ErrorResponse(BaseModel):
        """Every 4xx and 5xx answer."""

        detail: Union[str, list]

    return SimpleNamespace(**{model.__name__: model for model in (
        SearchOptions, SearchRequest, ResultRow, QueryResults, SearchResponse, ItemResponse,
        AuditRow, AuditResponse, HealthResponse, ShardInfo, VersionResponse, ErrorResponse)})
