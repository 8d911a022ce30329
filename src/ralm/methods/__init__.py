"""Scoring methods on a loaded LM: plain, in-context RALM and REPLUG, kNN-LM (and its store builder), RETRO-fit.

Importing this package registers every built-in method (``ralm.core.registry``); one line per method.
"""
# ruff: noqa: I001  (registration order is the order methods are listed in)

from ralm.methods import plain  # noqa: F401  "none"
from ralm.methods import in_context  # noqa: F401  "in-context", "replug"
from ralm.methods import knnlm  # noqa: F401  "knn-lm"
from ralm.methods.retro import method  # noqa: F401  "retro"
