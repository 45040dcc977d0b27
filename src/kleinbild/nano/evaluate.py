"""Evaluation on the shapes world: generate from held-out prompts, read the pixels back, count what is right."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from kleinbild.nano import shapes
from kleinbild.nano.analyze import analyze, matches

TASKS = ("single", "double", "edit", "compose", "held_out")
ATTRIBUTES = ("background", "count", "colour", "shape", "size", "position")


@dataclass
class Sample:
    example: shapes.Example
    image: Image.Image
    verdict: dict[str, bool]


@dataclass
class TaskResult:
    task: str
    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def score(self) -> float:
        return sum(s.verdict["all"] for s in self.samples) / max(1, len(self.samples))

    def attribute(self, name: str) -> float:
        return sum(s.verdict.get(name, False) for s in self.samples) / max(1, len(self.samples))


@dataclass
class Report:
    model: str
    steps: int
    guidance: float | None
    results: dict[str, TaskResult]

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "steps": self.steps,
            "guidance": self.guidance,
            "tasks": {
                t: {
                    "n": len(r.samples),
                    "score": round(r.score, 4),
                    **{a: round(r.attribute(a), 4) for a in ATTRIBUTES},
                    "seconds_per_image": round(r.seconds / max(1, len(r.samples)), 4),
                }
                for t, r in self.results.items()
            },
        }


def evaluate(
    pipe: Any, tasks: list[str] | tuple[str, ...] = TASKS, n: int = 50, seed: int = 0, steps: int | None = None
) -> Report:
    """Generate each task's held-out examples with `pipe` and score them with the analyser.

    `seed` picks both the example set and the noise (example i uses noise seed seed + i).
    """
    size = pipe.preset.default_size
    results = {}
    used_steps, used_guidance = steps or pipe.preset.default_steps, None
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown eval task {task!r}; choose from {', '.join(TASKS)}")
        res = TaskResult(task)
        t0 = time.perf_counter()
        for i, ex in enumerate(shapes.eval_set(task, n, seed)):
            refs = [shapes.render(s, size) for s in ex.sources]
            out = pipe.generate(ex.prompt, refs or None, width=size, height=size, steps=steps, seed=seed + i)
            used_guidance = out.settings["guidance"]
            img = out.images[0]
            res.samples.append(Sample(ex, img, matches(analyze(img), ex.target)))
        res.seconds = time.perf_counter() - t0
        results[task] = res
    return Report(pipe.preset.name, used_steps, used_guidance, results)


def format_table(report: Report) -> str:
    head = f"{report.model}, {report.steps} steps" + (f", CFG {report.guidance:g}" if report.guidance else "")
    lines = [head, f"{'task':<10} {'n':>4} {'all right':>9}  " + " ".join(f"{a:>10}" for a in ATTRIBUTES)]
    for t, r in report.results.items():
        attrs = " ".join(f"{r.attribute(a):>10.2f}" for a in ATTRIBUTES)
        lines.append(f"{t:<10} {len(r.samples):>4} {r.score:>9.2f}  {attrs}")
    return "\n".join(lines)


def save_grid(report: Report, path: Path, per_task: int = 4, cell: int = 128) -> None:
    """Rows of examples: references (if any), the output, and the prompt; a red frame marks a miss."""
    rows = [(t, s) for t, r in report.results.items() for s in r.samples[:per_task]]
    text_w = 360
    width = 3 * cell + text_w
    grid = Image.new("RGB", (width, cell * max(1, len(rows))), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for y, (task, s) in enumerate(rows):
        top = y * cell
        for j, src in enumerate(s.example.sources[:2]):
            grid.paste(shapes.render(src, cell // 2 if len(s.example.sources) > 1 else cell).resize(
                (cell // 2, cell // 2)), (j * (cell // 2), top + cell // 4))
        grid.paste(s.image.resize((cell, cell)), (cell, top))
        ok = s.verdict["all"]
        draw.rectangle([cell, top, 2 * cell - 1, top + cell - 1], outline=(0, 160, 0) if ok else (220, 0, 0), width=2)
        grid.paste(shapes.render(s.example.target, cell).resize((cell, cell)), (2 * cell, top))
        words, line, lines = s.example.prompt.split(), "", []
        for w in words:
            if len(line) + len(w) > 52:
                lines.append(line)
                line = ""
            line += w + " "
        lines.append(line)
        draw.text((3 * cell + 6, top + 6), f"[{task}] " + ("ok" if ok else "miss"), fill=(0, 0, 0))
        for k, ln in enumerate(lines[:7]):
            draw.text((3 * cell + 6, top + 22 + 14 * k), ln, fill=(40, 40, 40))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
