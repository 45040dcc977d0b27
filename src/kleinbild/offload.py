"""Memory modes: which weights are resident, and where, between the stages of a generation (and how many CPU
threads a run uses).

`none`: every component stays on the compute device (fastest when it all fits).
`model`: the text encoder exists only while a prompt is encoded, read again from its memory-mapped file
    when needed (the operating system's page cache makes that cheap); on an accelerator the transformer and
    autoencoder also wait in host memory and visit the device only for their own stage, so device memory
    holds one component at a time.
`sequential`: as `model`, and on an accelerator the transformer's blocks visit the device one at a time,
    so device memory holds one block plus the activations.

Host copies are the tensors the loader assigned (memory-mapped file pages where the file already had the
right layout and dtype), so parking a module again is a pointer swap, not a copy back.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

MODES = ("none", "model", "sequential")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown offload mode {mode!r}; use one of {', '.join(MODES)}")
    return mode


def _slots(module: nn.Module) -> list[tuple[nn.Module, str, Tensor]]:
    out = []
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            out.append((sub, name, p))
        for name, b in sub.named_buffers(recurse=False):
            if b is not None:
                out.append((sub, name, b))
    return out


def _put(owner: nn.Module, name: str, t: Tensor) -> None:
    # Replacing the entry (not `.data`) works across every device pair, meta included.
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(t, requires_grad=False)
    else:
        owner._buffers[name] = t


def move_resident(module: nn.Module, skip: Sequence[nn.Module], device: torch.device) -> None:
    """Move every weight of `module` that is not inside one of `skip` to `device`, for good."""
    skipped = {id(t) for b in skip for t in [*b.parameters(), *b.buffers()]}
    for owner, name, t in _slots(module):
        if id(t) not in skipped:
            _put(owner, name, t.data.to(device))


class Parked:
    """A module whose weights live on the host and visit `device` only inside `visit()`."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.module, self.device = module, torch.device(device)
        self.host = [t.data for _, _, t in _slots(module)]
        self.visits = 0  # how many times the weights were brought over (tests and metrics read it)

    def refresh(self) -> None:
        """Re-read the host tensors, after something replaced modules or weights (LoRA, quantization)."""
        self.host = [t.data for _, _, t in _slots(self.module)]

    def _place(self, tensors: Sequence[Tensor]) -> None:
        for (owner, name, _), h in zip(_slots(self.module), tensors, strict=True):
            _put(owner, name, h)

    def bring(self) -> None:
        """Put device copies of the host weights in place."""
        if len(_slots(self.module)) != len(self.host):
            self.refresh()
        self._place([h.to(self.device, non_blocking=True) for h in self.host])
        self.visits += 1

    def send_back(self) -> None:
        """Put the host weights back; the device copies are freed."""
        self._place(self.host)

    @contextmanager
    def visit(self) -> Iterator[nn.Module]:
        self.bring()
        try:
            yield self.module
        finally:
            self.send_back()


def sequential_blocks(blocks: Sequence[nn.Module], device: torch.device) -> list[Parked]:
    """Park each block; hooks bring a block's weights over for its own forward and send them back after."""
    parked = []
    for block in blocks:
        p = Parked(block, device)
        block.register_forward_pre_hook(lambda _m, _a, p=p: p.bring())
        block.register_forward_hook(lambda _m, _a, _o, p=p: p.send_back())
        parked.append(p)
    return parked


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """At most `n` torch CPU threads inside (None: as they are), unless OMP_NUM_THREADS says otherwise; the count
    is restored after. See `ModelPreset.cpu_threads`."""
    before = torch.get_num_threads()
    if n is None or n >= before or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
