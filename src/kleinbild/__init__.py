"""kleinbild: run the FLUX.2 [klein] image models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from kleinbild.pipeline import GenerationResult, KleinPipeline


def __getattr__(name: str) -> Any:
    # Lazy: importing the package must not import torch.
    if name in ("KleinPipeline", "GenerationResult"):
        from kleinbild import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)


__all__ = ["GenerationResult", "KleinPipeline", "__version__"]
