"""The search engine: FAISS candidates, exact certified rerank, scores, filters, calibration.

Layers, each usable alone:

- :mod:`~bayesretrieval.queries.uncertainty`: cosine moments of (query, item) pairs
  for the KFAC scalars, a per-item diagonal variance or a low-rank factor;
- :mod:`~bayesretrieval.queries.scorers`: the ranking scores, by name;
- :mod:`~bayesretrieval.queries.bounds` and :mod:`~bayesretrieval.queries.candidates`: FAISS
  candidates, reranked from the stored rows and grown until the certificate of
  docs/math.md section 8 holds;
- :mod:`~bayesretrieval.queries.filters`: subsets through FAISS ID selectors;
- :mod:`~bayesretrieval.queries.calibration`: the probit link and its storage;
- :mod:`~bayesretrieval.queries.searcher`: :class:`Searcher`, the whole engine;
- :mod:`~bayesretrieval.queries.sharded`: :class:`ShardedSearcher`, several index
  directories searched as one collection;
- :mod:`~bayesretrieval.queries.report`: the HTML results page;
- :mod:`~bayesretrieval.queries.audit`: the items the posterior is least sure of, no query needed.
"""

from bayesretrieval.queries.audit import audit_index
from bayesretrieval.queries.calibration import LogisticCalibration, ProbitCalibration
from bayesretrieval.queries.candidates import CandidateSearch, SearchOutcome
from bayesretrieval.queries.filters import ItemFilter
from bayesretrieval.queries.scorers import ScoreName, make_scorer
from bayesretrieval.queries.searcher import RESULT_COLUMNS, Searcher
from bayesretrieval.queries.sharded import SHARDED_RESULT_COLUMNS, ShardedSearcher

__all__ = [
    "RESULT_COLUMNS",
    "SHARDED_RESULT_COLUMNS",
    "CandidateSearch",
    "ItemFilter",
    "LogisticCalibration",
    "ProbitCalibration",
    "ScoreName",
    "SearchOutcome",
    "Searcher",
    "ShardedSearcher",
    "audit_index",
    "make_scorer",
]
