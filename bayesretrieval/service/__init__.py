"""An HTTP service over one index directory or several (``bayesretrieval serve``; needs the ``serve`` extra).

:func:`bayesretrieval.service.app.create_app` returns the FastAPI application; the
stdlib-only :mod:`bayesretrieval.service.security` holds the rules the command checks
before importing FastAPI (loopback binding, API tokens, paths inside the indexed folder).
"""

from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from bayesretrieval.service.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
