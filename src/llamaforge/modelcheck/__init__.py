"""`llamaforge check`: a model checked from the outside against what a LLaMA must do.

One registry (registry.CHECKS) of small functions, each with the bug it catches; the modules below
register them in the order they run: what a forward pass must do (behaviour), what training needs
(training), and what the Hugging Face ecosystem needs (interop).
"""

# registration, in the order the checks run (each module appends its checks to CHECKS)
from . import behaviour  # noqa: F401, I001
from . import training  # noqa: F401, I001
from . import interop  # noqa: F401, I001
from .registry import CHECKS, Row, Subject, run_checks

__all__ = ["CHECKS", "Row", "Subject", "run_checks"]
