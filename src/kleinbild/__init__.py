"""kleinbild: run the FLUX.2 [klein] image models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from kleinbild.loading import LoadOptions
    from kleinbild.pipeline import KleinPipeline
    from kleinbild.request import Request
    from kleinbild.result import GenerationResult

_LAZY = {"KleinPipeline": "pipeline", "GenerationResult": "result", "LoadOptions": "loading", "Request": "request"}


def __getattr__(name: str) -> Any:
    # Lazy: importing the package must not import torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"kleinbild.{_LAZY[name]}"), name)
    raise AttributeError(name)


__all__ = ["GenerationResult", "KleinPipeline", "LoadOptions", "Request", "__version__"]
