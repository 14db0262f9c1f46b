"""Option names and defaults the console script needs to build its parser.

Only the standard library is imported here, so that ``bayesretrieval --help`` and
``bayesretrieval COMMAND --help`` answer without loading torch, open_clip or FAISS. The
modules that use these values import them from here.
"""

from __future__ import annotations

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
