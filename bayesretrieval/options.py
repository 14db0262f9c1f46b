"""Option names and defaults the console script needs to build its parser.

Only the standard library is imported here, so that ``bayesretrieval --help`` and
``bayesretrieval COMMAND --help`` answer without loading torch, open_clip or FAISS. The
modules that use these values import them from here (``from bayesretrieval.similarity
import CosineEstimator`` keeps working).
"""

from __future__ import annotations

import os
from enum import Enum
from typing import TYPE_CHECKING, Callable, NamedTuple

if TYPE_CHECKING:
    from bayesretrieval.posterior.prior import FactorSpectrum

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"

DEFAULT_MAX_PIXELS = 178_956_970
"""Largest width x height decoded (twice Pillow's decompression-bomb warning limit)."""

DEFAULT_MAX_CANDIDATES = 65_536


class CosineEstimator(str, Enum):
    """How the mean and variance of ``cos(x, y)`` are approximated."""

    PUBLISHED = "published"
    """BayesVLM's ProbCosine with diagonal covariances (to reproduce published numbers)."""
    KRONECKER = "kronecker"
    """ProbCosine with the full output-side covariance ``Sigma_B``."""
    DELTA = "delta"
    """First-order delta method around the means (docs/math.md sections 3 and 7)."""
    SECOND_ORDER = "second_order"
    """Default: radial linearisation around ``E|x|^2`` plus the bilinear and curvature terms."""


DEFAULT_ESTIMATOR = CosineEstimator.SECOND_ORDER


class ScoreName(str, Enum):
    """The ranking scores."""

    EXPECTED = "expected"
    """Expected cosine ``m = E[cos]``."""
    LCB = "lcb"
    """Risk-averse lower confidence bound ``m - kappa sqrt(v)``."""
    UCB = "ucb"
    """Optimistic upper confidence bound ``m + kappa sqrt(v)``."""
    LCB_ITEM = "lcb_item"
    """Risk-averse on the item alone: ``m - kappa sqrt(v_item)``, the std the item's own noise
    contributes (the query's part is shared by every candidate of a query)."""
    PROBABILITY = "probability"
    """Calibrated probability of a match ``Phi((m - tau) / sqrt(v + noise_std^2))``."""
    MAP = "map"
    """Plain cosine of the mean embeddings (the deterministic CLIP baseline)."""


class BuildEngine(str, Enum):
    """Where ``build-index`` decodes and encodes the files its plan lists."""

    LOCAL = "local"
    """This process: decoding in loader processes, encoding in the main process."""
    RAY = "ray"
    """A Ray Data pipeline (decode in CPU tasks, encode in a pool of model actors), on a
    cluster or in a local Ray instance (the ``ray`` extra)."""


class ModelSize(str, Enum):
    """The trained models the project uses."""

    TEST = "test"
    """``bayes-tiny`` trained for well under a minute on 2 CPU cores; for tests."""
    BENCHMARK = "benchmark"
    """``bayes-small`` trained for about ten minutes on 2 CPU cores; for benchmarks."""


IMAGES_DIR = "images"
MANIFEST_FILE = "world.json"
MAX_SEVERITY = 5


class Part(str, Enum):
    """Which side of the split a world is drawn for."""

    TRAIN = "train"
    """The training world: only pairs and shapes of the split's training pool."""
    TEST = "test"
    """The in-distribution test world: the same distribution, an independent stream."""


class Shift(str, Enum):
    """A family of distribution shift; severity runs from 1 (mild) to 5 (severe)."""

    NOISE = "noise"
    """Additive Gaussian pixel noise, std 8 to 64 grey levels."""
    BLUR = "blur"
    """Gaussian blur, radius 0.5 to 3 pixels."""
    OCCLUSION = "occlusion"
    """Grey squares at random places covering about 6% to 45% of the image."""
    CONTRAST = "contrast"
    """Pixels pulled towards the image mean, keeping 60% down to 8% of the contrast."""
    JPEG = "jpeg"
    """JPEG compression at quality 30 down to 5."""
    COMBINATION = "combination"
    """A fraction severity/5 of images shows a colour-shape pair held out of training."""
    NOVEL_SHAPE = "novel_shape"
    """A fraction severity/5 of images shows a shape never seen in training."""

    @property
    def is_pixel(self) -> bool:
        """Whether the shift corrupts pixels (else it changes the scene content)."""
        from bayesretrieval.world.shifts import CORRUPTIONS

        return self in CORRUPTIONS


class ImageFormat(str, Enum):
    """How images are stored."""

    PNG = "png"
    """Lossless; the files decode to exactly the world's pixels."""
    JPEG = "jpeg"
    """Quality 95, like typical photos; pixels change slightly."""


TINY_MODEL = "bayes-tiny"
"""open_clip name of the tiny model config (``ModelSize.TEST``)."""
SMALL_MODEL = "bayes-small"
"""open_clip name of the small model config (``ModelSize.BENCHMARK``)."""


class TrainRun(NamedTuple):
    """The parts of a training run that ``train-clip --help`` shows.

    ``bayesretrieval.training.TRAIN_CONFIGS`` builds each ``TrainConfig`` from these and
    adds the optimiser settings.
    """

    model_name: str
    steps: int
    batch_size: int


TRAIN_RUNS: dict[ModelSize, TrainRun] = {
    ModelSize.TEST: TrainRun(TINY_MODEL, steps=250, batch_size=128),
    ModelSize.BENCHMARK: TrainRun(SMALL_MODEL, steps=800, batch_size=128),
}

DEFAULT_CHUNK_SIZE = 32_768
"""BayesVLM's ``C``: the number of InfoNCE classes per chunk."""
DEFAULT_SOURCE_BATCH = 1024
"""Sources per sub-batch when summing a chunk's curvature (memory ``O(b C + D^2)``)."""


class PriorObjective(str, Enum):
    """Objectives for choosing ``lambda`` by type-II maximum likelihood."""

    KRONECKER = "kronecker"
    """The Laplace evidence of the Kronecker-factored posterior (docs/math.md section 2); default."""
    BAYESVLM_REFERENCE = "bayesvlm_reference"
    """BayesVLM's reference code objective; reproduces its published lambdas."""

    @property
    def log_evidence(self) -> Callable[[FactorSpectrum, float, float], float]:
        """The function ``(spectrum, log_lambda, n) -> objective value`` (to maximise)."""
        from bayesretrieval.posterior.prior import OBJECTIVES

        return OBJECTIVES[self]


class BlockScope(str, Enum):
    """Which layers of the image tower the last-block posterior covers."""

    MLP = "mlp"
    """The last block's ``mlp.c_fc`` and ``mlp.c_proj``, and the image projection ``proj``."""
    MLP_ATTENTION = "mlp_attention"
    """As :attr:`MLP`, plus the last block's attention output projection ``attn.out_proj``."""

    @property
    def layers(self) -> tuple[str, ...]:
        """The covered layers' names, from the input side to the projection."""
        mlp = ("mlp.c_fc", "mlp.c_proj", "proj")
        return ("attn.out_proj", *mlp) if self is BlockScope.MLP_ATTENTION else mlp


DEFAULT_ROWS_PER_FILE = 1_000_000


class ExportFormat(str, Enum):
    """Layouts ``bayesretrieval export`` writes."""

    CLIP_RETRIEVAL = "clip-retrieval"
    """``img_emb/img_emb_{N}.npy`` (float16, L2-normalised means) row-aligned with
    ``metadata/metadata_{N}.parquet`` (``image_path``, ``item_id``, uncertainty columns)."""


def default_workers() -> int:
    """Loader processes: one per spare core, at most 8 (0 means decode in the main process)."""
    return min(8, max(1, (os.cpu_count() or 2) - 1))


class AuditScore(str, Enum):
    """What ``bayesretrieval audit`` ranks items by (docs/math.md section 4)."""

    SCALE = "scale"
    """``q = a^T A^-1 a``: how far the item's activation lies from the data the posterior was fitted on."""
    UNCERTAINTY = "uncertainty"
    """``tr S / |mu|^2``: the embedding's total variance over its squared norm."""


DEFAULT_SERVE_HOST = "127.0.0.1"
DEFAULT_SERVE_PORT = 8000
SERVE_TOKEN_ENV = "BAYESRETRIEVAL_TOKEN"
"""Environment variable ``bayesretrieval serve`` reads its API token from (``--token-file`` wins)."""
MIN_TOKEN_CHARS = 16
MAX_QUERY_CHARS = 1_000
MAX_QUERIES_PER_REQUEST = 64
MAX_RESULTS_PER_QUERY = 1_000
MAX_UPLOAD_BYTES = 20 * 2**20
"""Largest image upload ``bayesretrieval serve`` accepts (decoded pixels: :data:`DEFAULT_MAX_PIXELS`)."""

HIGH_UNCERTAINTY_PERCENTILE = 90.0
"""``bayesretrieval serve`` marks a result as highly uncertain when its item is less certain than
at least this percent of the collection by the audit's ranking score: a threshold from the posterior's
distribution over the whole index, the same for every query and page."""
