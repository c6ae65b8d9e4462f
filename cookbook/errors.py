"""Errors that tell the user what to do, and the small checks that raise them."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch


class CookbookError(Exception):
    """Base class for every error the cookbook raises on purpose."""


class MissingDependencyError(CookbookError, ImportError):
    """An optional package is needed for this call and is not installed."""


class GPURequiredError(CookbookError, RuntimeError):
    """The call runs only on a CUDA GPU, and none is available."""


class ModelLoadError(CookbookError, OSError):
    """The model name cannot be resolved or loaded."""


def require_module(module: str, pip_name: str | None = None, purpose: str = "") -> ModuleType:
    """Import `module` or raise an error that names the pip package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        why = f" (needed for {purpose})" if purpose else ""
        raise MissingDependencyError(
            f"The optional package '{pip_name or module}' is not installed{why}. "
            f"Install it with: pip install {pip_name or module}"
        ) from exc


def require_cuda(what: str) -> torch.device:
    """Return the CUDA device, or explain that `what` needs a GPU."""
    if not torch.cuda.is_available():
        raise GPURequiredError(
            f"{what} runs only on a CUDA GPU and this machine has none "
            "(torch.cuda.is_available() is False). The notebooks skip this step on CPU; "
            "run them on a machine with an NVIDIA GPU to see it."
        )
    return torch.device("cuda")
