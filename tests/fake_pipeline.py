"""A stand-in for KleinPipeline behind the server: the engine's real request validation (nano's preset), but images
made instantly from each image's seed, so queue, batching, cancel and progress tests take milliseconds.

Each image is a flat colour that encodes its seed and prompt, so a test can tell which request and which seed made
it; `gate` holds `run` before the first step, `step_wait` inside every step, and `fail` makes `run` raise.
"""

from __future__ import annotations

import threading
import zlib
from typing import Any

import torch
from PIL import Image

from kleinbild.config import get_preset
from kleinbild.request import Request, validate
from kleinbild.result import GenerationResult


def colour_of(seed: int, prompt: str) -> tuple[int, int, int]:
    return seed % 251, (seed // 251) % 251, zlib.crc32(prompt.encode()) % 251


class FakePipeline:
    def __init__(self, preset: str = "nano"):
        self.preset = get_preset(preset)
        self.source = "fake-model"
        self.batches: list[int] = []  # images per run() call
        self.calls: list[list[Request]] = []
        self.entered = threading.Event()  # set when run() is entered
        self.gate: threading.Event | None = None  # when set: run() waits for it before the first step
        self.step_wait: threading.Event | None = None  # when set: every step waits for it
        self.steps_seen: list[int] = []
        self.fail: Exception | None = None
        self.decodes = 0

    def request(self, prompt: Any, images: Any = None, **kwargs: Any) -> Request:
        return validate(self.preset, prompt, images, **kwargs)

    def run(self, requests: list[Request], callback: Any = None, callbacks: Any = None) -> list[GenerationResult]:
        self.calls.append(list(requests))
        self.batches.append(sum(r.num_images for r in requests))
        self.entered.set()
        if self.gate is not None and not self.gate.wait(30):
            raise RuntimeError("the test never opened the gate")
        if self.fail is not None:
            raise self.fail
        callbacks = callbacks or [None] * len(requests)
        self._steps(requests, callback, callbacks)
        rows = sum(r.num_images for r in requests)
        return [self._result(r, rows) for r in requests]

    def _steps(self, requests: list[Request], callback: Any, callbacks: list[Any]) -> None:
        first, ds = requests[0], self.preset.ae.downscale
        rows = sum(r.num_images for r in requests)
        latent = torch.zeros(rows, self.preset.ae.latent_channels, first.height // ds, first.width // ds)
        for step in range(1, first.steps + 1):
            self.steps_seen.append(step)
            if self.step_wait is not None:
                self.step_wait.wait(30)
            at = 0
            for req, own in zip(requests, callbacks, strict=True):
                if own is not None:
                    own(step, first.steps, latent[at : at + req.num_images])
                at += req.num_images
            if callback is not None:
                callback(step, first.steps, latent)

    def _result(self, req: Request, rows: int) -> GenerationResult:
        images = [Image.new("RGB", (req.width, req.height), colour_of(s, req.prompt)) for s in req.seeds]
        settings = {**req.settings(), "model": self.preset.name, "source": self.source, "dtype": "float32",
                    "quant": None, "compiled": False, "device": "cpu", "loras": [], "seconds": 0.0,
                    "timings": {"text": 0.0, "references": 0.0, "denoise": 0.0, "decode": 0.0},
                    "batch_size": rows, "cache": {}}
        return GenerationResult(images, settings)

    def decode(self, latent: torch.Tensor) -> list[Image.Image]:
        self.decodes += 1
        ds = self.preset.ae.downscale
        return [Image.new("RGB", (latent.shape[-1] * ds, latent.shape[-2] * ds)) for _ in range(latent.shape[0])]

    def prompt_tokens(self, prompt: str) -> int:
        return len(prompt.split())

    def configure_caches(self, prompts: int | None = None, references: int | None = None) -> None:
        pass

    def cache_stats(self) -> dict[str, dict[str, Any]]:
        empty = {"entries": 0, "max_entries": 0, "hits": 0, "misses": 0, "saved_seconds": 0.0}
        return {"prompt": dict(empty), "reference": dict(empty)}
