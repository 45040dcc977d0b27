"""Completing plain prompts for a model with a closed vocabulary (nano).

nano was trained mostly on captions that name each object's size and position, and it draws those well; given
"a red circle on a blue background" it often draws nothing, or a blob. A prompt made only of words the model
knows, and leaving some sizes or positions out, is rewritten in the model's best-learned phrasing with the missing
ones chosen from its preset (`PromptFill`): "a big red circle at the centre on a blue background". "two green
squares" becomes two objects. The choice depends on the prompt alone, so every seed of a request (and
`--from`) sees the same text. Anything the parser does not fully understand is left as written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from kleinbild.config import ModelPreset, PromptFill

_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
# Words a plain prompt may hold besides its objects and background ("a picture of ..., all on ...").
_FILLER = frozenset({"a", "an", "on", "with", "and", "the", "of", "plain", "against", "image", "picture", "all",
                     "shapes", "objects", "one", "two", "three", "in", "is", "there"})
_BACKGROUND_WORDS = ("background", "backdrop")


@dataclass(frozen=True)
class _Object:
    size: str | None
    colour: str | None
    shape: str
    place: str | None


def _alternatives(words: list[str]) -> str:
    # Longest first, so "top left corner" wins over "top left" and "top".
    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))


@cache
def _patterns(fill: PromptFill, objects: tuple[str, ...], colours: tuple[str, ...]) -> tuple[re.Pattern, ...]:
    size_words = [w for _, ws in fill.sizes for w in ws]
    phrases = [p for _, ps in fill.positions for p in ps]
    colour = _alternatives(list(colours))
    obj = re.compile(
        rf"\b(?:(?P<count>{_alternatives(list(_COUNTS))})\s+)?(?:(?P<size>{_alternatives(size_words)})\s+)?"
        rf"(?:(?P<colour>{colour})\s+)?(?P<shape>{_alternatives(list(objects))})(?P<plural>s)?\b"
        rf"(?:\s+(?P<place>{_alternatives(phrases)})\b)?"
    )
    background = re.compile(rf"\b(?P<bg>{colour})\s+(?:{_alternatives(list(_BACKGROUND_WORDS))})\b"
                            rf"|\bon\s+(?P<bare>{colour})\s*$")
    return obj, background


def complete_prompt(preset: ModelPreset, prompt: str) -> str | None:
    """The prompt with every object's size and position named, in the preset's phrasing; None when the preset has
    no `fill`, the prompt already names them all, or it holds a word (or a count) the model does not know."""
    fill = preset.fill
    if fill is None:
        return None
    obj_re, bg_re = _patterns(fill, preset.objects, preset.colours)
    text = " ".join(prompt.lower().split()).rstrip(".!")
    found = _objects(fill, obj_re, text)
    backgrounds = [m.group("bg") or m.group("bare") for m in bg_re.finditer(text)]
    rest = bg_re.sub(" ", obj_re.sub(" ", text))
    if found is None or not found or len(backgrounds) > 1 or len(found) > len(fill.layouts):
        return None
    if any(w not in _FILLER for w in re.findall(r"[a-z-]+", rest)) or re.search(r"[^a-z\s,;:.-]", rest):
        return None
    if all(o.size and o.place for o in found):
        return None
    placed = _place(fill, found)
    if placed is None:
        return None
    items = [" ".join(w for w in ("a", o.size or fill.size, o.colour, o.shape) if w) + f" at the {o.place}"
             for o in placed]
    background = f" on a {backgrounds[0]} background" if backgrounds else ""
    return " and ".join(items) + background


def _objects(fill: PromptFill, obj_re: re.Pattern, text: str) -> list[_Object] | None:
    """Each object the text names (a counted group gives one per count); None when a count does not fit its noun
    ("a circles", "two circle") or a group names one place for all ("two circles at the top")."""
    size_of = {w: size for size, ws in fill.sizes for w in ws}
    place_of = {p: pos for pos, ps in fill.positions for p in ps}
    out: list[_Object] = []
    for m in obj_re.finditer(text):
        n = _COUNTS.get(m.group("count") or "a", 1)
        if (n > 1) != bool(m.group("plural")) or (n > 1 and m.group("place")):
            return None
        place = place_of[m.group("place")] if m.group("place") else None
        size = size_of[m.group("size")] if m.group("size") else None
        out += [_Object(size, m.group("colour"), m.group("shape"), place)] * n
    return out


def _place(fill: PromptFill, found: list[_Object]) -> list[_Object] | None:
    """Objects with a place each: the named ones keep theirs, the rest take the layout's free places in order."""
    taken = [o.place for o in found if o.place]
    if len(set(taken)) != len(taken):
        return None
    order = [*fill.layouts[len(found) - 1], *(pos for pos, _ in fill.positions)]
    free = [p for i, p in enumerate(order) if p not in taken and p not in order[:i]]
    out = []
    for o in found:
        if o.place is None:
            o = _Object(o.size, o.colour, o.shape, free.pop(0))
        out.append(o)
    return out


__all__ = ["complete_prompt"]
