"""Security rules of the service: who may connect, and which files it may serve.

Only the standard library is imported, so ``bayesretrieval serve`` checks its options
before loading FastAPI.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path

from bayesretrieval.options import MIN_TOKEN_CHARS, SERVE_TOKEN_ENV


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def read_token(token_file: str | Path | None = None, environ: dict | None = None) -> str | None:
    """The API token from ``token_file`` (first line, stripped) or ``$BAYESRETRIEVAL_TOKEN``, or ``None``.

    Raises:
        ValueError: for an unreadable or empty token file, or a token shorter than
            :data:`MIN_TOKEN_CHARS`.
    """
    environ = os.environ if environ is None else environ
    if token_file is not None:
        try:
            lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read the token file {token_file}: {err}") from None
        token, origin = (lines[0].strip() if lines else ""), f"token file {token_file}"
    else:
        token, origin = environ.get(SERVE_TOKEN_ENV, "").strip(), f"${SERVE_TOKEN_ENV}"
        if not token:
            return None
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the API token from {origin} has {len(token)} characters, at least {MIN_TOKEN_CHARS} "
                         "are needed (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to serve on a non-loopback address without an API token.

    Raises:
        ValueError: saying why and how to give a token.
    """
    if token is None and not is_loopback(host):
        raise ValueError(f"refusing to listen on {host!r} without an API token: other machines could search the "
                         f"index and read its images. Give one with --token-file FILE or ${SERVE_TOKEN_ENV} "
                         "(clients send 'Authorization: Bearer TOKEN'), or bind to 127.0.0.1")


def token_matches(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (constant-time comparison)."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8"))


def resolve_item_file(source_root: str | Path, stored_path: str) -> Path | None:
    """The real file of an indexed item, or ``None`` unless it lies inside ``source_root``.

    The stored path is joined to the indexed folder and every symlink resolved; a path
    that leaves the folder (``..``, an absolute path, a symlink pointing out) or names
    no regular file gives ``None``.
    """
    try:
        root = Path(source_root).resolve(strict=True)
        target = (root / stored_path).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # missing, a symlink loop, a NUL byte
        return None
    if not root.is_dir() or not target.is_relative_to(root) or not target.is_file():
        return None
    return target
