"""Fetching BayesVLM's published posterior factors, verified by sha256 and cached.

The factors for open_clip ``ViT-B-32`` / ``laion2b_s34b_b79k`` live in the AaltoML/BayesVLM
GitHub repository (MIT licence). They are fetched from a pinned commit, every file is
checked against a hard-coded sha256, and the verified files are cached under
``cache_dir("posteriors", "bayesvlm", <folder>)``. Offline (``BAYESRETRIEVAL_OFFLINE=1`` or
``HF_HUB_OFFLINE=1``) nothing is downloaded: a missing file is an immediate error that
says where to put it. The cache can be filled from a local copy with ``source_dir``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bayesretrieval.cache import cache_dir
from bayesretrieval.encoders import ModelIdentity, file_sha256
from bayesretrieval.posterior.io import PosteriorPair, load_bayesvlm_posterior

OFFLINE_ENV_VARS = ("BAYESRETRIEVAL_OFFLINE", "HF_HUB_OFFLINE")
DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class PublishedPosterior:
    """A posterior published as files in a Git repository at a pinned commit.

    Attributes:
        model_name: open_clip architecture it belongs to.
        pretrained: open_clip pretrained tag it belongs to.
        repository: GitHub ``owner/name``.
        commit: the pinned commit.
        folder: folder inside the repository.
        files: ``{file name: sha256}``.
    """

    model_name: str
    pretrained: str
    repository: str
    commit: str
    folder: str
    files: dict

    @property
    def name(self) -> str:
        """The folder's last component (used as the cache folder name)."""
        return self.folder.rstrip("/").rsplit("/", 1)[-1]

    def urls(self, file_name: str) -> list[str]:
        """Where to download a file: raw Git content, then the Git LFS media endpoint."""
        path = f"{self.repository}/{self.commit}/{self.folder}/{file_name}"
        return [f"https://raw.githubusercontent.com/{path}", f"https://media.githubusercontent.com/media/{path}"]


BAYESVLM_VIT_B_32 = PublishedPosterior(
    model_name="ViT-B-32",
    pretrained="laion2b_s34b_b79k",
    repository="AaltoML/BayesVLM",
    commit="855be8b601bf5e3e3136c0a01a585bdfe5d9ad4c",
    folder="hessians/hessian_CLIP-ViT-B-32-laion2B-s34B-b79K",
    files={
        "A_img_analytic.pt": "a7955cff6f3aa1696c7ad4f996ccaf1896db299e52a9369d3dbd1cda35ccc51d",
        "A_txt_analytic.pt": "9e2c0d7841fac19da4c51adc4f1134c2214fe0bd056198b944e5786409e81f65",
        "B_img_analytic.pt": "ec78cd329c9f26bf52409d6964c0f470acc75f159966b8d57bcea69862f1e60c",
        "B_txt_analytic.pt": "aa1108d0cabaf77e8c8bd80c22e1de34f0f58b2a6c7a87fe8deba989dcd97b51",
        "prior_precision_analytic.json": "575115c921819a9053930f74bedd6908ce4f4ac131aa6a177471188da98066c9",
    },
)

PUBLISHED = {(BAYESVLM_VIT_B_32.model_name, BAYESVLM_VIT_B_32.pretrained): BAYESVLM_VIT_B_32}
"""Published posteriors by ``(open_clip model, pretrained tag)``."""


class PosteriorUnavailableError(FileNotFoundError):
    """The published files are not cached and cannot be downloaded here."""


def published_posterior(model_name: str, pretrained: str | None) -> PublishedPosterior:
    """The published posterior for a model.

    Raises:
        ValueError: naming the model asked for and the ones that have published factors.
    """
    entry = PUBLISHED.get((model_name, str(pretrained)))
    if entry is None:
        known = ", ".join(f"{m}/{p}" for m, p in PUBLISHED)
        raise ValueError(
            f"no published BayesVLM posterior for {model_name}/{pretrained}; published ones: {known} "
            "(pass a posterior path instead)"
        )
    return entry


def is_offline() -> bool:
    """Whether downloads are disabled by ``BAYESRETRIEVAL_OFFLINE`` or ``HF_HUB_OFFLINE``."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_ENV_VARS)


def fetch_published_files(
    entry: PublishedPosterior = BAYESVLM_VIT_B_32,
    cache: str | Path | None = None,
    source_dir: str | Path | None = None,
) -> Path:
    """Make sure every file of ``entry`` is in the cache, verified; return the folder.

    Args:
        entry: which published posterior.
        cache: the cache folder (default ``cache_dir("posteriors", "bayesvlm", entry.name)``).
        source_dir: copy from this local folder instead of downloading (pre-filling).

    Returns:
        The folder holding the verified files (a BayesVLM hessian directory).

    Raises:
        PosteriorUnavailableError: offline, or the download failed; says where to put the files.
        ValueError: a file's sha256 differs from the published one (names both digests).
    """
    folder = Path(cache) if cache is not None else cache_dir("posteriors", "bayesvlm", entry.name)
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, expected in entry.files.items():
        target = folder / file_name
        if target.is_file() and file_sha256(target) == expected:
            continue
        if source_dir is not None:
            _install(Path(source_dir) / file_name, target, expected, f"{source_dir}")
        else:
            _download(entry, file_name, target, expected, folder)
    return folder


def load_published_posterior(
    model_name: str = BAYESVLM_VIT_B_32.model_name,
    pretrained: str | None = BAYESVLM_VIT_B_32.pretrained,
    cache: str | Path | None = None,
    source_dir: str | Path | None = None,
    pseudo_data_count: float | tuple[float, float] | None = None,
    prior_precision: float | tuple[float, float] | None = None,
) -> PosteriorPair:
    """Fetch (or find in the cache) and load the published posterior for a model.

    Returns:
        The :class:`PosteriorPair`, with ``model`` set to the open_clip identity.
    """
    entry = published_posterior(model_name, pretrained)
    folder = fetch_published_files(entry, cache, source_dir)
    pair = load_bayesvlm_posterior(folder, pseudo_data_count, prior_precision)
    pair.model = ModelIdentity(entry.model_name, entry.pretrained)
    return pair


def _install(source: Path, target: Path, expected: str, origin: str) -> None:
    if not source.is_file():
        raise PosteriorUnavailableError(f"{source.name} not found in {origin}")
    got = file_sha256(source)
    if got != expected:
        raise ValueError(f"{source}: sha256 {got}, published file has {expected}")
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, temp)
        os.replace(temp, target)
    finally:
        Path(temp).unlink(missing_ok=True)


def _download(entry: PublishedPosterior, file_name: str, target: Path, expected: str, folder: Path) -> None:
    where = (
        f"put {', '.join(entry.files)} from {entry.repository}@{entry.commit[:10]}/{entry.folder} "
        f"into {folder}, or pass the folder holding them as the posterior path"
    )
    if is_offline():
        raise PosteriorUnavailableError(
            f"BayesVLM posterior file {file_name} is not cached and downloads are off; {where}")
    errors = []
    for url in entry.urls(file_name):
        fd, temp = tempfile.mkstemp(prefix=f".{file_name}.", dir=folder)
        try:
            with os.fdopen(fd, "wb") as handle, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                shutil.copyfileobj(response, handle)
            got = file_sha256(temp)
            if got == expected:
                os.replace(temp, target)
                return
            errors.append(f"{url}: sha256 {got}, expected {expected}")
        except (urllib.error.URLError, OSError) as err:
            errors.append(f"{url}: {err}")
        finally:
            Path(temp).unlink(missing_ok=True)
    raise PosteriorUnavailableError(f"could not download {file_name} ({'; '.join(errors)}); {where}")
