"""Evaluation on the shapes world: generate from held-out prompts, read the pixels back, count what is right."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from kleinbild.nano import shapes
from kleinbild.nano.analyze import analyze, matches
from kleinbild.nano.plain import PLAIN_TASKS, plain_set, plain_verdict

# "plain" / "plain_double": one / two objects from captions a new user writes (see kleinbild.nano.plain).
TASKS = ("single", "double", "edit", "compose", "held_out", "masked", *PLAIN_TASKS)
# The masked task: the edit task's examples whose change has a place to mask (not the background's), with a mask
# over every object the edit changes, grown by MASK_PAD pixels, and the unmasked pixels kept.
MASKED_KINDS = ("recolour", "move", "add", "remove")
MASK_PAD = 6
ATTRIBUTES = ("background", "count", "colour", "shape", "size", "position")


@dataclass
class Sample:
    example: shapes.Example
    image: Image.Image
    verdict: dict[str, bool]
    settings: dict[str, Any] = field(default_factory=dict, repr=False)  # what generate() reported


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
    pipe: Any, tasks: list[str] | tuple[str, ...] = TASKS, n: int = 50, seed: int = 0, steps: int | None = None,
    options: dict[str, Any] | None = None,
) -> Report:
    """Generate each task's held-out examples with `pipe` and score them with the analyser.

    `seed` picks both the example set and the noise (example i uses noise seed seed + i); `options` go to every
    generate() call (e.g. cache="first-block").
    """
    size = pipe.preset.default_size
    results = {}
    used_steps, used_guidance = steps or pipe.preset.default_steps, None
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown eval task {task!r}; choose from {', '.join(TASKS)}")
        res = TaskResult(task)
        t0 = time.perf_counter()
        examples, names_bg = _examples(task, n, seed)
        for i, ex in enumerate(examples):
            refs = [shapes.render(s, size) for s in ex.sources]
            edit: dict[str, Any] = {}
            if task == "masked":
                edit = dict(mask=edit_mask(ex, size), keep_unmasked=True)
            out = pipe.generate(ex.prompt, refs or None, width=size, height=size, steps=steps, seed=seed + i, **edit,
                                **(options or {}))
            used_guidance = out.settings["guidance"]
            img = out.images[0]
            if task in PLAIN_TASKS:
                verdict = plain_verdict(analyze(img), ex.target, names_bg[i])
            else:
                verdict = matches(analyze(img), ex.target)
            if edit:  # every pixel outside the mask is the source's (to 1 level)
                keep = np.asarray(edit["mask"]) == 0
                diff = np.abs(np.asarray(img, np.int16) - np.asarray(refs[0], np.int16)).max(axis=-1)
                verdict["unmasked_kept"] = bool((diff[keep] <= 1).all())
            res.samples.append(Sample(ex, img, verdict, out.settings))
        res.seconds = time.perf_counter() - t0
        results[task] = res
    return Report(pipe.preset.name, used_steps, used_guidance, results)


def _examples(task: str, n: int, seed: int) -> tuple[list[shapes.Example], list[bool]]:
    """A task's examples, and for each whether its caption names the background (plain captions may not)."""
    if task in PLAIN_TASKS:
        pairs = plain_set(task, n, seed)
        return [ex for ex, _ in pairs], [named for _, named in pairs]
    examples = masked_examples(n, seed) if task == "masked" else shapes.eval_set(task, n, seed)
    return examples, [True] * len(examples)


def masked_examples(n: int, seed: int = 0) -> list[shapes.Example]:
    """The first `n` edit-task examples of the kinds a mask can hold (the edit task's own, in its order)."""
    per_cycle = len(MASKED_KINDS) / len(shapes.EDIT_KINDS)
    pool = shapes.eval_set("edit", int(n / per_cycle) + len(shapes.EDIT_KINDS), seed)
    return [ex for ex in pool if ex.edit in MASKED_KINDS][:n]


def edit_mask(ex: shapes.Example, size: int, pad: int = MASK_PAD) -> Image.Image:
    """White over every object the edit changes, where it was and where it goes, grown by `pad` pixels."""
    source = ex.sources[0]
    changed = [o for o in source.objects if o not in ex.target.objects]
    changed += [o for o in ex.target.objects if o not in source.objects]
    m = np.zeros((size, size), np.uint8)
    for o in changed:
        x1, y1, x2, y2 = shapes.object_box(o, size)
        m[max(0, int(y1) - pad) : int(y2 + 1) + pad, max(0, int(x1) - pad) : int(x2 + 1) + pad] = 255
    return Image.fromarray(m)


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
