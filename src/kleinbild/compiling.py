"""torch.compile for the pipeline's modules, counted: every graph compiled is logged and numbered.

A compiled module's graph is specialised on its input shapes unless they are marked dynamic. With
``dynamic=True`` the token counts (image size), batch and text length are symbolic from the first call, so one
graph serves every size; dynamo still specialises a dimension of size 1 (a batch of one image), so a batch of one
and a larger batch are two graphs. With ``dynamic=None`` (torch's default) the first size gets a static graph and
the first other size recompiles a dynamic one. ``dynamic=False`` compiles one graph per size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SHAPES = {"dynamic": True, "auto": None, "static": False}  # the `--compile-shapes` names of `dynamic`


class CompileCounter:
    """A torch.compile backend that counts and logs the graphs it is handed, then compiles them with the real one.

    `inductor` goes through torch's own inductor wrapper, so `mode` ("max-autotune", "reduce-overhead", ...) means
    what it means to `torch.compile`; any other backend name (e.g. "eager", for tests) is looked up by dynamo."""

    def __init__(self, name: str, mode: str | None = None, dynamic: bool | None = None, backend: str = "inductor"):
        if backend != "inductor" and mode is not None:
            raise ValueError(f"compile mode {mode!r} is inductor's; backend {backend!r} takes none")
        import torch  # here, so that the CLI can parse sizes without loading torch

        self.name = name
        self.graphs = 0
        if backend == "inductor":
            self._inner: Callable[..., Any] = torch._TorchCompileInductorWrapper(mode, None, dynamic)
        else:
            self._inner = torch._dynamo.lookup_backend(backend)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.graphs += 1
        shapes = [tuple(t.shape) for t in example_inputs if hasattr(t, "shape")][:2]
        log.info("compiling %s: graph %d (inputs %s)", self.name, self.graphs, shapes)
        return self._inner(gm, example_inputs)


def compile_counted(fn: Callable[..., Any], name: str, mode: str | None = None, dynamic: bool | None = None,
                    backend: str = "inductor") -> tuple[Callable[..., Any], CompileCounter]:
    """`fn` compiled with a counting backend, and the counter."""
    import torch

    counter = CompileCounter(name, mode, dynamic, backend)
    compiled = torch.compile(fn, backend=counter, dynamic=dynamic)
    if dynamic is False:
        return compiled, counter
    from torch.fx.experimental import _config as fx_config

    def call(*args: Any, **kwargs: Any) -> Any:
        # Duck sizing would tie sizes that happen to be equal at the first call (64 image tokens and 64 text tokens
        # at nano's 128x128) and recompile when they part.
        with fx_config.patch(use_duck_shape=False):
            return compiled(*args, **kwargs)

    return call, counter


def compile_shapes(name: str) -> bool | None:
    """torch.compile's `dynamic` for a `--compile-shapes` name."""
    if name not in SHAPES:
        raise ValueError(f"compile shapes must be one of {', '.join(SHAPES)}, got {name!r}")
    return SHAPES[name]


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"512x512,1024x768" -> [(512, 512), (1024, 768)] (width x height), for warm-up flags."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        w, sep, h = item.lower().partition("x")
        if not (sep and w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
            raise ValueError(f"sizes are WIDTHxHEIGHT separated by commas (e.g. 512x512,1024x768), got {item!r}")
        out.append((int(w), int(h)))
    return out


__all__ = ["SHAPES", "CompileCounter", "compile_counted", "compile_shapes", "parse_sizes"]
