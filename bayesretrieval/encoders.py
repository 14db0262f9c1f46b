"""open_clip wrapper that returns mean embeddings and pre-projection activations in one pass.

Only the two projection matrices are Bayesian (docs/math.md section 1): an embedding is
``g = a @ P`` with ``a`` the pooled activation in front of the projection. The encoder
runs each tower once with its projection detached and applies ``P`` itself, so the
activation and the embedding come from the same forward pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, Sequence

import open_clip
import torch
from torch import nn

from bayesretrieval.options import DEFAULT_MODEL, DEFAULT_PRETRAINED

logger = logging.getLogger(__name__)

_CONFIGS_REGISTERED = False


class UnsupportedModelError(ValueError):
    """The model's projection is not a plain linear map the posterior can cover."""


def register_model_configs() -> None:
    """Register the project's small open_clip configs (``bayes-tiny``, ``bayes-small``).

    Safe to call many times; afterwards ``open_clip.create_model_and_transforms("bayes-tiny")``
    builds a real open_clip CLIP offline in well under a second.
    """
    global _CONFIGS_REGISTERED
    if _CONFIGS_REGISTERED:
        return
    config_dir = resources.files("bayesretrieval") / "model_configs"
    open_clip.add_model_config(Path(str(config_dir)))
    _CONFIGS_REGISTERED = True


@dataclass(frozen=True)
class ModelIdentity:
    """What a posterior or an index was made with.

    Attributes:
        model_name: open_clip architecture name, e.g. ``"ViT-B-32"``.
        pretrained: open_clip tag, checkpoint path, or ``None`` for random init.
        checkpoint_sha256: sha256 of the checkpoint file when ``pretrained`` is a path.
    """

    model_name: str
    pretrained: str | None
    checkpoint_sha256: str | None = None

    def to_dict(self) -> dict:
        """Return a JSON-ready dict."""
        return {
            "model_name": self.model_name,
            "pretrained": self.pretrained,
            "checkpoint_sha256": self.checkpoint_sha256,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ModelIdentity":
        """Build from :meth:`to_dict` output."""
        return cls(data["model_name"], data.get("pretrained"), data.get("checkpoint_sha256"))

    def matches(self, other: "ModelIdentity") -> bool:
        """Whether two identities name the same weights (checksums win over paths)."""
        if self.checkpoint_sha256 or other.checkpoint_sha256:
            return (self.model_name, self.checkpoint_sha256) == (
                other.model_name,
                other.checkpoint_sha256,
            )
        return (self.model_name, self.pretrained) == (other.model_name, other.pretrained)


@dataclass
class Encoded:
    """Mean embeddings and the activations they were projected from.

    Attributes:
        embeds: unnormalised mean embeddings ``a @ P``, shape ``(N, D)``.
        activations: pre-projection activations ``a``, shape ``(N, h)``.
    """

    embeds: torch.Tensor
    activations: torch.Tensor


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _image_projection(model: nn.Module, model_name: str) -> torch.Tensor:
    visual = getattr(model, "visual", None)
    proj = getattr(visual, "proj", None)
    if not isinstance(proj, nn.Parameter) or proj.ndim != 2:
        tower = type(visual).__name__
        raise UnsupportedModelError(
            f"model {model_name!r}: image tower {tower} has no plain linear projection "
            "(visual.proj); heads such as attention pooling with bias or MLP projections "
            "are not covered by the Laplace posterior"
        )
    return proj


def _text_projection_owner(model: nn.Module, model_name: str) -> nn.Module:
    for owner in (model, getattr(model, "text", None)):
        if owner is not None and hasattr(owner, "text_projection"):
            proj = owner.text_projection
            if isinstance(proj, nn.Parameter) and proj.ndim == 2:
                return owner
            if isinstance(proj, nn.Linear) and proj.bias is None:
                return owner
            raise UnsupportedModelError(
                f"model {model_name!r}: text projection is {type(proj).__name__}"
                f"{' with bias' if isinstance(proj, nn.Linear) else ''}; only a plain "
                "linear map without bias is covered by the Laplace posterior"
            )
    raise UnsupportedModelError(
        f"model {model_name!r}: text tower has no text_projection (MLP or custom heads "
        "are not covered by the Laplace posterior)"
    )


def _as_matrix(proj: nn.Module | torch.Tensor) -> torch.Tensor:
    """Return a projection as an ``(h, D)`` matrix acting as ``a @ P``."""
    if isinstance(proj, nn.Linear):
        return proj.weight.T
    return proj


@contextlib.contextmanager
def _detached(owner: nn.Module, attribute: str) -> Iterator[torch.Tensor]:
    """Temporarily set ``owner.attribute`` to None so the tower returns its activation.

    This changes the model, so callers hold the encoder's forward lock, as readers of the
    projections do: a service encodes queries from several threads at once.
    """
    projection = getattr(owner, attribute)
    setattr(owner, attribute, None)
    try:
        yield _as_matrix(projection)
    finally:
        setattr(owner, attribute, projection)


class ClipEncoder:
    """An open_clip CLIP model that returns mean embeddings plus activations.

    Args:
        model: an open_clip CLIP-style model.
        preprocess: the model's eval image transform.
        tokenizer: the model's tokenizer.
        identity: which weights these are.
        device: where to run.
        dtype: compute dtype for the towers (float32 by default).

    Raises:
        UnsupportedModelError: if either projection is not a plain linear map.
    """

    def __init__(
        self,
        model: nn.Module,
        preprocess,
        tokenizer,
        identity: ModelIdentity,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.identity = identity
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(self.device, dtype).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        _image_projection(self.model, identity.model_name)
        self._text_owner = _text_projection_owner(self.model, identity.model_name)
        self._forward_lock = threading.RLock()

    @classmethod
    def from_pretrained(
        cls,
        model_name: str = DEFAULT_MODEL,
        pretrained: str | Path | None = DEFAULT_PRETRAINED,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "ClipEncoder":
        """Build an encoder through ``open_clip.create_model_and_transforms``.

        Args:
            model_name: open_clip architecture (``"ViT-B-32"``, ``"bayes-tiny"``, ...).
            pretrained: an open_clip tag (downloaded on first use), a local checkpoint
                path, or ``None`` for random initialisation.
            device: where to run.
            dtype: compute dtype.

        Returns:
            The encoder.
        """
        register_model_configs()
        tag = str(pretrained) if pretrained is not None else None
        sha = file_sha256(tag) if tag is not None and Path(tag).is_file() else None
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=tag, device=device
        )
        tokenizer = open_clip.get_tokenizer(model_name)
        identity = ModelIdentity(model_name, tag, sha)
        return cls(model, preprocess, tokenizer, identity, device=device, dtype=dtype)

    @property
    def image_projection(self) -> torch.Tensor:
        """The image projection ``P_I`` as an ``(h_I, D)`` matrix."""
        with self._forward_lock:
            return _image_projection(self.model, self.identity.model_name).detach()

    @property
    def text_projection(self) -> torch.Tensor:
        """The text projection ``P_T`` as an ``(h_T, D)`` matrix."""
        with self._forward_lock:
            return _as_matrix(self._text_owner.text_projection).detach()

    @property
    def logit_scale(self) -> float:
        """``s = exp(logit_scale)`` of the model."""
        return float(self.model.logit_scale.detach().exp())

    @property
    def embed_dim(self) -> int:
        """Embedding dimension ``D``."""
        return int(self.image_projection.shape[1])

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokenize texts with the model's tokenizer, shape ``(N, context_length)``."""
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts))

    @torch.no_grad()
    def encode_image_batch(self, images: torch.Tensor) -> Encoded:
        """Encode one batch of preprocessed images, shape ``(N, 3, H, W)``."""
        images = images.to(self.device, self.dtype)
        with self._forward_lock, _detached(self.model.visual, "proj") as projection:
            activations = self.model.visual(images)
        return Encoded(activations @ projection, activations)

    @torch.no_grad()
    def encode_text_batch(self, tokens: torch.Tensor) -> Encoded:
        """Encode one batch of token ids, shape ``(N, context_length)``."""
        tokens = tokens.to(self.device)
        with self._forward_lock, _detached(self._text_owner, "text_projection") as projection:
            activations = self.model.encode_text(tokens)
        return Encoded(activations @ projection, activations)

    def encode_images(self, images: torch.Tensor, batch_size: int = 256) -> Encoded:
        """Encode preprocessed images in batches; see :meth:`encode_image_batch`."""
        return _concat(self.encode_image_batch(b) for b in images.split(batch_size))

    def encode_texts(self, texts: Sequence[str] | torch.Tensor, batch_size: int = 256) -> Encoded:
        """Encode texts (strings or token ids) in batches; see :meth:`encode_text_batch`."""
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        return _concat(self.encode_text_batch(b) for b in tokens.split(batch_size))


def _concat(parts: Iterator[Encoded]) -> Encoded:
    parts = list(parts)
    return Encoded(
        torch.cat([p.embeds for p in parts]), torch.cat([p.activations for p in parts])
    )
