"""Reading and writing posteriors: BayesVLM directories, BayesVLM-Base buffers, our own format.

Formats:

- BayesVLM directory: ``A_img_analytic.pt``, ``B_img_analytic.pt``, ``A_txt_analytic.pt``,
  ``B_txt_analytic.pt`` (raw curvature factors, before the prior) and
  ``prior_precision_analytic.json`` (``lambda_img, lambda_txt, n_img, n_txt``).
- BayesVLM-Base checkpoint: a safetensors file with buffers ``image_a_inv``,
  ``image_b_diag``, ``text_a_inv``, ``text_b_diag`` (diagonal output side only).
- Project format: a directory with ``posterior.safetensors`` and ``posterior.json``
  (format version, source, model identity, per-modality ``n``/``lambda``, fingerprint).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bayesretrieval.atomic import publish_directory
from bayesretrieval.encoders import ModelIdentity
from bayesretrieval.posterior.kronecker import KroneckerPosterior, Modality

FORMAT_VERSION = 1
PROJECT_TENSORS = "posterior.safetensors"
PROJECT_METADATA = "posterior.json"
BAYESVLM_PRIOR_FILE = "prior_precision_analytic.json"
BAYESVLM_SUFFIX = {Modality.IMAGE: "img", Modality.TEXT: "txt"}
BAYESVLM_BASE_PREFIX = {Modality.IMAGE: "image", Modality.TEXT: "text"}


@dataclass
class PosteriorPair:
    """The image and text posteriors of one model, with where they came from.

    Attributes:
        image: posterior over the image projection.
        text: posterior over the text projection.
        source: a short description (``"bayesvlm:<dir>"``, ``"fitted"``, ...).
        model: identity of the model the posterior was fitted for, if known.
        reference: per modality (``"image"``, ``"text"``), the 0th to 100th percentiles of
            :meth:`KroneckerPosterior.relative_variance` over a sample of the pairs the
            posterior was fitted on (``None`` when unknown, e.g. BayesVLM's factors): what
            "unusually uncertain" means for an input of that modality.
    """

    image: KroneckerPosterior
    text: KroneckerPosterior
    source: str = "unknown"
    model: ModelIdentity | None = None
    reference: dict | None = None

    def __iter__(self):
        return iter((self.image, self.text))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> KroneckerPosterior:
        return (self.image, self.text)[index]

    @property
    def fingerprint(self) -> str:
        """sha256 over both posteriors' covariance factors and priors (content identity)."""
        digest = hashlib.sha256()
        for posterior in (self.image, self.text):
            for matrix in (posterior.a_inv, posterior.output_cov):
                digest.update(matrix.detach().cpu().contiguous().numpy().tobytes())
            digest.update(repr((posterior.pseudo_data_count, posterior.prior_precision)).encode())
        return digest.hexdigest()

    def identity(self) -> dict:
        """JSON-ready description: source, fingerprint, and ``n``/``lambda`` per modality."""
        return {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "model": self.model.to_dict() if self.model else None,
            **{p.modality.value: _modality_metadata(p) for p in self},
        }

    def check_encoder(self, encoder) -> None:
        """Raise ``ValueError`` if the encoder's projections have other shapes."""
        name = encoder.identity.model_name
        self.image.check_projection(tuple(encoder.image_projection.shape), name)
        self.text.check_projection(tuple(encoder.text_projection.shape), name)

    def save(self, directory: str | Path) -> Path:
        """Write the project format to ``directory`` atomically (temp dir, then rename)."""
        tensors = {}
        for posterior in self:
            prefix = posterior.modality.value
            tensors[f"{prefix}.a_inv"] = posterior.a_inv.contiguous()
            tensors[f"{prefix}.output_cov"] = posterior.output_cov.contiguous()
            for name, factor in (posterior.factors or {}).items():
                tensors[f"{prefix}.factor_{name}"] = factor.contiguous()
        metadata = {"format_version": FORMAT_VERSION, **self.identity(), "reference": self.reference}

        def write(staging: Path) -> None:
            save_file(tensors, str(staging / PROJECT_TENSORS))
            (staging / PROJECT_METADATA).write_text(json.dumps(metadata, indent=2))

        publish_directory(Path(directory), write)
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> "PosteriorPair":
        """Read the project format written by :meth:`save`."""
        directory = Path(directory)
        metadata = json.loads((directory / PROJECT_METADATA).read_text())
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{directory}: posterior format version {metadata.get('format_version')}, "
                f"this library reads version {FORMAT_VERSION}"
            )
        tensors = load_file(str(directory / PROJECT_TENSORS))
        image, text = (_posterior_from_tensors(tensors, metadata, m) for m in Modality)
        model = ModelIdentity.from_dict(metadata["model"]) if metadata.get("model") else None
        pair = cls(image, text, metadata.get("source", "unknown"), model, metadata.get("reference"))
        if pair.fingerprint != metadata["fingerprint"]:
            raise ValueError(f"{directory}: posterior content does not match its fingerprint")
        return pair


def _modality_metadata(posterior: KroneckerPosterior) -> dict:
    return {
        "pseudo_data_count": posterior.pseudo_data_count,
        "prior_precision": posterior.prior_precision,
        "is_diagonal": posterior.is_diagonal,
        "in_features": posterior.in_features,
        "out_features": posterior.out_features,
    }


def _posterior_from_tensors(tensors: dict, metadata: dict, modality: Modality) -> KroneckerPosterior:
    prefix = modality.value
    info = metadata[prefix]
    factors = {
        name: tensors[f"{prefix}.factor_{name}"]
        for name in ("A", "B")
        if f"{prefix}.factor_{name}" in tensors
    }
    return KroneckerPosterior(
        a_inv=tensors[f"{prefix}.a_inv"],
        output_cov=tensors[f"{prefix}.output_cov"],
        modality=modality,
        is_diagonal=info["is_diagonal"],
        pseudo_data_count=info["pseudo_data_count"],
        prior_precision=info["prior_precision"],
        factors=factors or None,
    )


def _pair_values(value, name: str) -> tuple:
    if value is None or isinstance(value, (int, float)):
        return value, value
    values = tuple(value)
    if len(values) != 2:
        raise ValueError(f"{name} must be one number or an (image, text) pair, got {value!r}")
    return values


def load_bayesvlm_posterior(
    path: str | Path,
    pseudo_data_count: float | tuple[float, float] | None = None,
    prior_precision: float | tuple[float, float] | None = None,
) -> PosteriorPair:
    """Load a BayesVLM hessian directory (raw factors plus prior JSON).

    Args:
        path: directory with ``A_img_analytic.pt``, ..., ``prior_precision_analytic.json``.
        pseudo_data_count: ``n``; one number, an ``(image, text)`` pair, or ``None`` for
            the JSON's ``n_img``/``n_txt``.
        prior_precision: ``lambda``; one number, a pair, or ``None`` for the JSON's values.

    Returns:
        ``PosteriorPair`` that unpacks as ``(image_posterior, text_posterior)``.
    """
    path = Path(path)
    prior_file = path / BAYESVLM_PRIOR_FILE
    if not prior_file.is_file():
        raise FileNotFoundError(f"{path} is not a BayesVLM hessian directory: no {BAYESVLM_PRIOR_FILE}")
    prior = json.loads(prior_file.read_text())
    counts = _pair_values(pseudo_data_count, "pseudo_data_count")
    lambdas = _pair_values(prior_precision, "prior_precision")
    posteriors = []
    for modality, n, lam in zip(Modality, counts, lambdas):
        suffix = BAYESVLM_SUFFIX[modality]
        factors = [
            torch.load(path / f"{f}_{suffix}_analytic.pt", map_location="cpu", weights_only=True)
            for f in ("A", "B")
        ]
        n = prior[f"n_{suffix}"] if n is None else n
        lam = prior[f"lambda_{suffix}"] if lam is None else lam
        posteriors.append(KroneckerPosterior.from_factors(*factors, n, lam, modality))
    return PosteriorPair(*posteriors, source=f"bayesvlm:{path.name}")


def save_bayesvlm_directory(pair: PosteriorPair, path: str | Path) -> Path:
    """Write raw factors and priors in BayesVLM's directory layout (readable by its code)."""
    prior = {}
    tensors = {}
    for posterior in pair:
        if posterior.factors is None:
            raise ValueError(
                f"{posterior.modality.value} posterior has no raw factors; BayesVLM's format "
                "stores A and B before the prior"
            )
        suffix = BAYESVLM_SUFFIX[posterior.modality]
        prior[f"lambda_{suffix}"] = posterior.prior_precision
        prior[f"n_{suffix}"] = posterior.pseudo_data_count
        for name, factor in posterior.factors.items():
            tensors[f"{name}_{suffix}_analytic.pt"] = factor.to(torch.float32)

    def write(staging: Path) -> None:
        for file_name, tensor in tensors.items():
            torch.save(tensor.contiguous(), staging / file_name)
        (staging / BAYESVLM_PRIOR_FILE).write_text(json.dumps(prior, indent=4))

    publish_directory(Path(path), write)
    return Path(path)


def load_bayesvlm_base(path: str | Path) -> PosteriorPair:
    """Load the posterior buffers of a BayesVLM-Base transformers checkpoint (safetensors).

    Only the diagonal of ``Sigma_B`` survives in that format, so both posteriors are
    diagonal (``is_diagonal=True``).
    """
    tensors = load_file(str(path))
    posteriors = []
    for modality in Modality:
        prefix = BAYESVLM_BASE_PREFIX[modality]
        a_inv = _find_buffer(tensors, f"{prefix}_a_inv", path)
        b_diag = _find_buffer(tensors, f"{prefix}_b_diag", path)
        posteriors.append(
            KroneckerPosterior(a_inv, torch.diag(b_diag.to(torch.float64)), modality, is_diagonal=True)
        )
    return PosteriorPair(*posteriors, source=f"bayesvlm-base:{Path(path).name}")


def _find_buffer(tensors: dict, name: str, path) -> torch.Tensor:
    matches = [key for key in tensors if key == name or key.endswith(f".{name}")]
    if len(matches) != 1:
        raise ValueError(f"{path}: expected one buffer named {name!r}, found {matches or 'none'}")
    return tensors[matches[0]]


def load_posterior(
    path: str | Path,
    pseudo_data_count: float | tuple[float, float] | None = None,
    prior_precision: float | tuple[float, float] | None = None,
) -> PosteriorPair:
    """Load any supported posterior format, detected from what is at ``path``.

    ``n`` and ``lambda`` overrides apply to formats that keep the raw factors.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"posterior not found: {path}")
    if (path / BAYESVLM_PRIOR_FILE).is_file():
        return load_bayesvlm_posterior(path, pseudo_data_count, prior_precision)
    if path.is_file() and path.suffix == ".safetensors":
        pair = load_bayesvlm_base(path)
    elif (path / PROJECT_METADATA).is_file():
        pair = PosteriorPair.load(path)
    else:
        raise ValueError(
            f"{path} is neither a posterior directory ({PROJECT_METADATA}), a BayesVLM "
            f"directory ({BAYESVLM_PRIOR_FILE}) nor a BayesVLM-Base .safetensors file"
        )
    if pseudo_data_count is None and prior_precision is None:
        return pair
    counts = _pair_values(pseudo_data_count, "pseudo_data_count")
    lambdas = _pair_values(prior_precision, "prior_precision")
    rebuilt = [p.with_prior(n, lam) for p, n, lam in zip(pair, counts, lambdas)]
    return PosteriorPair(*rebuilt, source=pair.source, model=pair.model)
