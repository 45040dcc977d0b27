"""A deterministic reader of shapes-world images: which background, which objects, where, how big, what shape.

Used to score generated images against the scene they were asked for (see `kleinbild.nano.shapes`). Pure numpy, with its
own connected-component labelling (a run-length union-find); a 128 px image takes about a millisecond.

Pipeline: a 3x3 mean takes the edge off pixel noise; every pixel is classified to its nearest palette colour (far from
all of them: unknown); the border's most common class is the background; connected components of each other class are
object candidates. Anti-aliased or blurred edges leave thin rims of in-between colours (red on yellow blends through
orange), so a candidate must also have a solid interior (pixels whose whole 3x3 neighbourhood shares the class), and
nearby fragments of one colour merge. Each object is then measured on its coverage map (how far each pixel lies from
the background colour towards the object's), which is sub-pixel and unchanged in sum by blur: area, fill ratio, the
vertical skew that marks a triangle, centroid.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from kleinbild.nano.shapes import COLOURS, PALETTE, POSITIONS, SIZE_FRACTIONS, Obj, Scene

_PALETTE_RGB = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)
# Pixels farther than this (RGB distance) from every palette colour are "unknown". The closest palette pair is ~90
# apart, so a true colour with noise and a small shift stays well inside, while most mixes of two colours fall out.
_UNKNOWN_DISTANCE = 80.0
# Candidates under this share of the image are specks (noise, fringes), not objects.
_MIN_AREA_FRACTION = 0.004
# A real object keeps a good part of its pixels after a 3x3 erosion; a one- or two-pixel fringe keeps next to none.
_MIN_CORE_FRACTION = 0.15
# Same-colour fragments whose boxes are at most this far apart (share of the image side, at least 1 px) are one object.
# Objects in neighbouring cells are 1/3 - SIZE_FRACTIONS["big"] = 0.033 apart, more once anti-aliased rims are shed.
_MERGE_GAP_FRACTION = 0.02
# How far around an object's class pixels its blurred edge is looked for (share of the image side, at least 2 px).
_REGION_MARGIN = 0.03
_SIZE_THRESHOLD = (SIZE_FRACTIONS["small"] + SIZE_FRACTIONS["big"]) / 2
_GRID = (("top left", "top", "top right"), ("left", "centre", "right"), ("bottom left", "bottom", "bottom right"))


@dataclass(frozen=True)
class Found:
    shape: str
    colour: str
    size: str
    position: str
    area: int  # covered pixels (the coverage map's sum, rounded)
    bbox: tuple[int, int, int, int]  # (left, top, right, bottom), right/bottom exclusive like a PIL box


@dataclass(frozen=True)
class Analysis:
    background: str
    objects: tuple[Found, ...]

    def scene(self) -> Scene:
        """The Scene this analysis describes (objects in reading order of their cells)."""
        return Scene(self.background, tuple(Obj(f.shape, f.colour, f.size, f.position) for f in self.objects))


def _to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image)
    floating = np.issubdtype(arr.dtype, np.floating)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)  # CHW, as tensors come
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    arr = arr[:, :, :3].astype(np.float32)
    # Float images in [0, 1] (the usual tensor convention) are scaled up; anything else is taken as 0..255.
    if floating and arr.size and arr.max() <= 1.0:
        arr = arr * 255.0
    return arr


def _box3(rgb: np.ndarray) -> np.ndarray:
    """3x3 mean (edges replicated): averages pixel noise down by 3 before classification."""
    h, w = rgb.shape[:2]
    pad = np.pad(rgb, ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = pad[:-2] + pad[1:-1] + pad[2:]
    return (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / 9.0


_LUT_BITS = 6  # per channel: bins 4 levels wide, far finer than the ~90 between palette colours


@functools.cache
def _class_lut() -> np.ndarray:
    """Nearest palette index (-1: unknown) for every quantised RGB colour; built once, on first use."""
    levels = (np.arange(1 << _LUT_BITS, dtype=np.float32) + 0.5) * (256 >> _LUT_BITS)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 1, 3)
    d2 = ((grid - _PALETTE_RGB[None]) ** 2).sum(-1)
    lut = d2.argmin(1).astype(np.int8)
    lut[d2.min(1) > _UNKNOWN_DISTANCE**2] = -1
    return lut


def _classify(rgb: np.ndarray) -> np.ndarray:
    """Nearest palette index per pixel (int8), -1 where no palette colour is close."""
    q = np.clip(rgb, 0, 255.99).astype(np.int32) >> (8 - _LUT_BITS)
    return _class_lut()[(q[..., 0] << (2 * _LUT_BITS)) | (q[..., 1] << _LUT_BITS) | q[..., 2]]


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def label_components(classes: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of equal non-negative values in an int array; negative values are not labelled.

    Returns (labels, count): labels is -1 outside components and 0..count-1 inside.
    """
    h, w = classes.shape
    # A -1 sentinel column ends every row, so a run never wraps into the next row.
    padded = np.full((h, w + 1), -1, dtype=np.int16)
    padded[:, :w] = classes
    flat = padded.ravel()
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1))
    lengths = np.diff(np.append(starts, flat.size))
    values = flat[starts]
    fg = np.flatnonzero(values >= 0)
    rows = (starts[fg] // (w + 1)).tolist()
    x0 = (starts[fg] % (w + 1)).tolist()
    x1 = (np.asarray(x0) + lengths[fg]).tolist()
    val = values[fg].tolist()
    n = len(fg)
    parent = list(range(n))
    # Runs come sorted by row then column; sweep each pair of consecutive rows with two pointers.
    row_start: dict[int, int] = {}
    for k, r in enumerate(rows):
        row_start.setdefault(r, k)
    row_end = {r: k + 1 for k, r in enumerate(rows)}
    for r, a in row_start.items():
        if r + 1 not in row_start:
            continue
        a_end, b, b_end = row_end[r], row_start[r + 1], row_end[r + 1]
        while a < a_end and b < b_end:
            # Touching diagonally counts (8-connectivity): [x0, x1) ranges within one column of each other.
            if x0[a] <= x1[b] and x0[b] <= x1[a] and val[a] == val[b]:
                ra, rb = _find(parent, a), _find(parent, b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            if x1[a] < x1[b]:
                a += 1
            else:
                b += 1
    roots = [_find(parent, k) for k in range(n)]
    ids: dict[int, int] = {}
    run_labels = [ids.setdefault(r, len(ids)) for r in roots]
    seg_labels = np.full(len(starts), -1, dtype=np.int32)
    seg_labels[fg] = run_labels
    labels = np.repeat(seg_labels, lengths).reshape(h, w + 1)[:, :w]
    return labels, len(ids)


def _core(classes: np.ndarray) -> np.ndarray:
    """Pixels whose 8 neighbours all share their (non-negative) class: a 3x3 erosion of every class at once."""
    h, w = classes.shape
    pad = np.pad(classes, 1, constant_values=-1)
    core = classes >= 0
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if dy != 1 or dx != 1:
                core &= pad[dy:dy + h, dx:dx + w] == classes
    return core


# Area / bounding-box area of each shape as rendered; also turns a measured area back into a box side.
_FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}


def _classify_shape(fill: float, skew: float) -> str:
    """circle / square / triangle from the fill ratio and the vertical skewness of the object's mass (an upright
    triangle has its mass towards the base: about -0.57 unblurred; circles and squares 0)."""
    if skew < -0.15:
        return "triangle"
    # Unblurred: square 1, circle ~0.8 (pi/4 over slightly shortened chords). Blur shortens a circle's chords more.
    return "square" if fill > 0.885 else "circle"


def _top_mean(values: np.ndarray, k: int) -> float:
    return float(np.sort(values)[-k:].mean())


def _measure(alpha: np.ndarray, x0: int, y0: int) -> tuple[float, float, float, float, float, tuple[int, ...]]:
    """Area, fill ratio, vertical skewness, centroid (x, y) and box of one object's coverage map (at offset x0, y0).

    Soft measures throughout: the box of a 12 px object is off by a pixel either way, which alone moves a square's
    fill ratio by 15%, while the longest row and column sums of the coverage (a square's side, a circle's diameter,
    a triangle's base and height) are sub-pixel and survive blur.
    """
    inside = alpha >= 0.5
    area = float(alpha.sum())
    if area <= 0 or not inside.any():
        return 0.0, 0.0, 0.0, 0.0, 0.0, (x0, y0, x0, y0)
    ys, xs = np.nonzero(inside)
    box = (int(xs.min()) + x0, int(ys.min()) + y0, int(xs.max()) + 1 + x0, int(ys.max()) + 1 + y0)
    # Averaging the few longest chords keeps noise from picking one lucky row.
    k = max(2, round(0.25 * (box[3] - box[1])))
    width, height = _top_mean(alpha.sum(1), k), _top_mean(alpha.sum(0), k)
    fill = area / max(width * height, 1e-6)
    weight = np.clip(alpha, 0.0, 1.0)
    mass = float(weight.sum())
    rows, cols = weight.sum(1), weight.sum(0)
    y = np.arange(alpha.shape[0]) + 0.5
    cy = float(rows @ y) / mass
    var = float(rows @ (y - cy) ** 2) / mass
    skew = float(rows @ (y - cy) ** 3) / mass / max(var, 1e-6) ** 1.5
    cx = float(cols @ (np.arange(alpha.shape[1]) + 0.5)) / mass
    return area, fill, skew, cx + x0, cy + y0, box


def analyze(image: Image.Image | np.ndarray) -> Analysis:
    """Read the background and objects of a shapes-world image (PIL image or HxWx3 array, uint8 or float).

    Exact on clean renders from 48 px up; at 32 px a small object is 6 px across and about half the scenes are misread.
    """
    rgb = _box3(_to_rgb_array(image))
    h, w = rgb.shape[:2]
    classes = _classify(rgb)
    border = np.concatenate((classes[0], classes[-1], classes[1:-1, 0], classes[1:-1, -1]))
    border = border[border >= 0]
    if border.size == 0:
        border = classes[classes >= 0]
    bg = int(np.bincount(border, minlength=len(COLOURS)).argmax()) if border.size else 0

    fg = classes.copy()
    fg[fg == bg] = -1
    labels, count = label_components(fg)
    if count == 0:
        return Analysis(COLOURS[bg], ())
    flat = labels.ravel()
    inside = flat >= 0
    areas = np.bincount(flat[inside], minlength=count)
    core = _core(fg)
    cores = np.bincount(labels[core], minlength=count)
    keep = np.flatnonzero((areas >= _MIN_AREA_FRACTION * h * w) & (cores >= _MIN_CORE_FRACTION * areas))

    ys, xs = np.divmod(np.flatnonzero(inside), w)
    lab = flat[inside]
    blobs = []
    for k in keep.tolist():
        sel = lab == k
        bx, by = xs[sel], ys[sel]
        blobs.append({"labels": [k], "colour": int(fg.ravel()[by[0] * w + bx[0]]),
                      "box": [int(bx.min()), int(by.min()), int(bx.max()) + 1, int(by.max()) + 1]})
    blobs = _merge_fragments(blobs, max(1, round(_MERGE_GAP_FRACTION * max(h, w))))

    # Measure each object on its coverage ("alpha") relative to the actual background and object colours rather than
    # on its class pixels: edges blend towards the background through other palette colours (red -> orange ->
    # yellow), so the class alone shrinks objects and rounds corners, while the coverage sum is unchanged by blur.
    edge_rgb = np.concatenate((rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]))
    edge_classes = np.concatenate((classes[0], classes[-1], classes[1:-1, 0], classes[1:-1, -1]))
    background_rgb = (edge_rgb[edge_classes == bg] if (edge_classes == bg).any() else rgb[classes == bg]).mean(0)
    margin = max(2, round(_REGION_MARGIN * max(h, w)))
    boxes = np.array([b["box"] for b in blobs], dtype=np.float64)
    found = []
    for i, blob in enumerate(blobs):
        x0, y0, x1, y1 = blob["box"]
        crop = labels[y0:y1, x0:x1]
        own = crop == blob["labels"][0] if len(blob["labels"]) == 1 else np.isin(crop, blob["labels"])
        own_core = own & core[y0:y1, x0:x1]
        pixels = rgb[y0:y1, x0:x1][own_core if own_core.any() else own]
        colour_rgb = pixels.mean(0)
        # The class interior of a small blurred object still holds partly covered pixels, which would bias the colour
        # towards the background and every coverage above 1; re-estimating from the nearly fully covered ones fixes it.
        for _ in range(2):
            axis = colour_rgb - background_rgb
            pure = _project(pixels - background_rgb, axis) > 0.85
            if pure.any():
                colour_rgb = pixels[pure].mean(0)
        axis = colour_rgb - background_rgb
        rx0, ry0, rx1, ry1 = max(0, x0 - margin), max(0, y0 - margin), min(w, x1 + margin), min(h, y1 + margin)
        alpha = _project(rgb[ry0:ry1, rx0:rx1] - background_rgb, axis)
        # Pixels nearer another object's box belong to that object (its fringe can lean towards this colour).
        if len(blobs) > 1:
            alpha[_box_distance(np.arange(rx0, rx1) + 0.5, np.arange(ry0, ry1) + 0.5, boxes).argmin(0) != i] = 0.0
        area, fill, skew, cx, cy, box = _measure(alpha, rx0, ry0)
        if area < _MIN_AREA_FRACTION * h * w:
            continue
        shape = _classify_shape(fill, skew)
        # The coverage area is blur-proof where the box is not (blur eats a triangle's apex); it gives the side.
        side = float(np.sqrt(area / _FILL[shape] / (h * w)))
        size = "big" if side > _SIZE_THRESHOLD else "small"
        position = _GRID[min(2, max(0, int(cy / h * 3)))][min(2, max(0, int(cx / w * 3)))]
        found.append(Found(shape, COLOURS[blob["colour"]], size, position, round(area), box))
    order = list(POSITIONS)
    found.sort(key=lambda f: (order.index(f.position), f.bbox))
    return Analysis(COLOURS[bg], tuple(found))


def _project(vectors: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """Coordinate of RGB vectors along `axis` (1 at the axis' tip). Written per channel: a BLAS matrix-vector product
    this small is dominated by thread start-up and gets erratically slow on a busy machine."""
    a0, a1, a2 = (float(v) for v in axis / max(float(axis @ axis), 1.0))
    return vectors[..., 0] * a0 + vectors[..., 1] * a1 + vectors[..., 2] * a2


def _box_distance(x: np.ndarray, y: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Distance from the grid points (x, y[:, None]) to each box (left, top, right, bottom): (len(boxes), ny, nx)."""
    dx = np.maximum(np.maximum(boxes[:, 0, None] - x, x - boxes[:, 2, None]), 0.0)[:, None, :]
    dy = np.maximum(np.maximum(boxes[:, 1, None] - y, y - boxes[:, 3, None]), 0.0)[:, :, None]
    return np.hypot(dx, dy)


def _merge_fragments(blobs: list[dict], gap: int) -> list[dict]:
    merged = True
    while merged:
        merged = False
        for i in range(len(blobs)):
            for j in range(i + 1, len(blobs)):
                a, b = blobs[i], blobs[j]
                if a["colour"] != b["colour"]:
                    continue
                dx = max(b["box"][0] - a["box"][2], a["box"][0] - b["box"][2], 0)
                dy = max(b["box"][1] - a["box"][3], a["box"][1] - b["box"][3], 0)
                if dx <= gap and dy <= gap:
                    a["labels"] += b["labels"]
                    a["box"] = [min(a["box"][0], b["box"][0]), min(a["box"][1], b["box"][1]),
                                max(a["box"][2], b["box"][2]), max(a["box"][3], b["box"][3])]
                    del blobs[j]
                    merged = True
                    break
            if merged:
                break
    return blobs


# ---------------------------------------------------------------------------------------------------------------------
# Scoring

_ATTRS = ("colour", "shape", "size")


def _pair(found: Sequence[Obj], expected: Sequence[Obj]) -> list[tuple[int, int | None]]:
    """Pairs (expected index, found index or None): same cell first, then the best remaining look-alike."""
    free = set(range(len(found)))
    pairs: dict[int, int | None] = {}

    def agreement(e: Obj, f: Obj) -> int:
        return sum(getattr(e, a) == getattr(f, a) for a in _ATTRS)

    for i, e in enumerate(expected):
        same_cell = [j for j in sorted(free) if found[j].position == e.position]
        if same_cell:
            j = max(same_cell, key=lambda j: (agreement(e, found[j]), -j))
            pairs[i] = j
            free.discard(j)
    # Objects found in the wrong cell: greedily pair the most similar leftovers, so a moved object is judged a
    # position error rather than a missing object plus an extra one.
    rest = [i for i in range(len(expected)) if i not in pairs]
    while rest and free:
        i, j = max(((i, j) for i in rest for j in sorted(free)),
                   key=lambda ij: (agreement(expected[ij[0]], found[ij[1]]), -ij[0], -ij[1]))
        pairs[i] = j
        rest.remove(i)
        free.discard(j)
    return [(i, pairs.get(i)) for i in range(len(expected))]


def matches(analysis: Analysis, expected: Scene) -> dict[str, bool]:
    """Per-attribute verdicts of `analysis` against `expected`.

    "background"; "count" (as many objects found as expected); "colour", "shape", "size", "position": every expected
    object has a found counterpart (paired by cell first, then by resemblance) that agrees on that attribute, so a
    missing object fails all four; "all": everything right, with no missing and no extra objects.
    """
    found = analysis.scene().objects
    pairs = _pair(found, expected.objects)
    verdict = {"background": analysis.background == expected.background, "count": len(found) == len(expected.objects)}
    for attr in (*_ATTRS, "position"):
        verdict[attr] = all(
            j is not None and getattr(expected.objects[i], attr) == getattr(found[j], attr) for i, j in pairs
        )
    verdict["all"] = all(verdict.values())
    return verdict


def score(images: Sequence[Image.Image | np.ndarray], expected: Sequence[Scene]) -> float:
    """Fraction of images whose analysis matches their expected scene on everything."""
    if len(images) != len(expected):
        raise ValueError(f"{len(images)} images but {len(expected)} expected scenes")
    if not images:
        return 0.0
    return sum(matches(analyze(img), exp)["all"] for img, exp in zip(images, expected, strict=True)) / len(images)
