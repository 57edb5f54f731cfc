"""Synthetic scene world: ``synthetic://scenes?n=N&seed=S&size=W[&grid=G]``.

The offline test bed and demo world of FineViT. Each scene holds 1 to 5 flat
objects (shape, colour, size, texture, 3x3 grid position, optional word) on a
pale plain or gradient background, in one of several aspect ratios. With
``grid=2`` the objects sit in the four corner cells of a 2x2 grid instead (1 to
4 objects, each up to a quarter of the image rather than a ninth), so at 128
pixels an object spans more of a small encoder's 16-pixel patches. It comes
with three kinds of text:

* :func:`alt_text` -- short, vague, sometimes wrong web-style alt-text;
* :func:`dense_caption` -- an exact dense description of every object,
  counts, spatial relations, rendered words (quoted) and the background;
* :func:`region_annotations` -- one tight normalized box per object and one
  per rendered word, each with an attribute caption and a short label.

Words: an object that carries a word has it rendered *below the shape, in the
same grid cell*, in black letters; the shape is shrunk to leave room. The word
has its own region (label ``"text"``) and its own box (``SceneObject.word_box``).

Everything is a pure function of ``(seed, index, size)``: the scene graph is
drawn from ``random.Random(f"finevit-scene:{seed}:{index}")`` (the random draws
do not depend on ``size``; only pixel geometry does, plus words are dropped in
cells too small to hold them legibly), so eval can rebuild any scene and its
hard negatives (:func:`perturb`) without storing them.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# --------------------------------------------------------------------------- vocabulary

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")

# Saturated / dark object colours, chosen to stay apart from each other and from the
# pale backgrounds after JPEG. White is deliberately absent (too close to pale backgrounds).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 130, 0),
    "yellow": (240, 210, 0),
    "green": (30, 150, 50),
    "cyan": (0, 190, 210),
    "blue": (30, 70, 220),
    "purple": (130, 40, 180),
    "pink": (245, 110, 180),
    "brown": (130, 75, 30),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "pale yellow": (250, 243, 205),
    "pale blue": (214, 230, 246),
    "pale green": (218, 242, 214),
    "pale pink": (249, 224, 230),
    "light gray": (228, 228, 228),
    "cream": (245, 237, 220),
    "pale lavender": (233, 226, 247),
}

SIZES: tuple[str, ...] = ("small", "medium", "large")
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted")
POSITIONS: tuple[str, ...] = (
    "top left",
    "top center",
    "top right",
    "center left",
    "center",
    "center right",
    "bottom left",
    "bottom center",
    "bottom right",
)
# the cells of each grid, named as in the 3x3 one (so relations and text parsing are the same)
GRID_POSITIONS: dict[int, tuple[str, ...]] = {
    3: POSITIONS,
    2: ("top left", "top right", "bottom left", "bottom right"),
}
WORDS: tuple[str, ...] = (
    "STOP",
    "CAFE",
    "OPEN",
    "SALE",
    "EXIT",
    "BAR",
    "HOTEL",
    "TAXI",
    "BUS",
    "PIZZA",
    "BANK",
    "SHOP",
    "GYM",
    "ZOO",
    "MENU",
    "FOOD",
    "PARK",
    "INN",
    "BOOK",
    "SOUP",
    "TOYS",
    "FISH",
    "GOLD",
    "JAZZ",
    "LOVE",
    "HOME",
    "WIFI",
    "KING",
    "MOON",
    "TEA",
    "SUSHI",
    "MILK",
)
ASPECTS: tuple[tuple[str, float], ...] = (
    ("1:1", 1.0),
    ("4:3", 4 / 3),
    ("3:4", 3 / 4),
    ("16:9", 16 / 9),
    ("9:16", 9 / 16),
    ("2:1", 2.0),
    ("1:2", 0.5),
)
PERTURBATIONS: tuple[str, ...] = (
    "swap_color",
    "recolor",
    "shape",
    "size",
    "texture",
    "move",
    "count",
    "word",
    "background",
)

TEXT_RGB: tuple[int, int, int] = (15, 15, 15)
_SIZE_FRAC = {"small": 0.45, "medium": 0.68, "large": 0.92}
_WORD_P = 0.3
_GRADIENT_P = 0.35
_MIN_WORD_CELL = 30  # px: cells shorter than this carry no word
_PLURAL = {"cross": "crosses"}
_NUM = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

Box = tuple[float, float, float, float]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class SceneObject:
    """One drawn object. ``box``/``word_box`` are normalized (x0, y0, x1, y1)."""

    shape: str
    color: str
    size: str
    texture: str
    position: str
    word: str | None
    box: Box
    word_box: Box | None = None
    jitter: tuple[float, float] = (0.5, 0.5)  # placement of the shape inside its cell, in [0, 1]


@dataclass(frozen=True)
class Scene:
    """A scene graph; ``background_spec`` is ("solid", name) or ("gradient", direction, name_a, name_b)."""

    seed: int
    index: int
    width: int
    height: int
    background: str
    background_spec: tuple
    objects: tuple[SceneObject, ...]
    grid: int = 3  # objects sit in the cells of a grid x grid layout (GRID_POSITIONS)


# --------------------------------------------------------------------------- geometry


def max_objects(grid: int) -> int:
    """How many objects a scene of this grid holds at most."""
    return min(5, grid * grid)


def _cell_rect(position: str, width: int, height: int, grid: int) -> tuple[float, float, float, float]:
    row, col = divmod(GRID_POSITIONS[grid].index(position), grid)
    cw, ch = width / grid, height / grid
    return col * cw, row * ch, cw, ch


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _word_font_size(word: str, avail_w: float, avail_h: float) -> int:
    fs = max(6, int(avail_h * 0.85))
    left, _, right, _ = _font(fs).getbbox(word)
    if right - left > avail_w:
        fs = max(6, int(fs * avail_w / (right - left)))
    return fs


@lru_cache(maxsize=512)
def _word_mask(word: str, fs: int) -> Image.Image:
    """Tight L mask of ``word`` in the default font at size ``fs``."""
    font = _font(fs)
    left, top, right, bottom = font.getbbox(word)
    im = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(im).text((-left, -top), word, font=font, fill=255)
    bbox = im.getbbox()
    return im.crop(bbox) if bbox else im


def _layout(
    obj: SceneObject, width: int, height: int, grid: int
) -> tuple[int, int, int, tuple[int, int, int] | None]:
    """Pixel layout: (shape_x, shape_y, side, (word_x, word_y, font_size) or None)."""
    x0, y0, cw, ch = _cell_rect(obj.position, width, height, grid)
    pad = max(1.0, 0.06 * min(cw, ch))
    area_h = ch * 0.68 if obj.word else ch
    side = max(4, int(_SIZE_FRAC[obj.size] * min(cw - 2 * pad, area_h - 2 * pad)))
    jx, jy = obj.jitter
    sx = int(round(x0 + pad + jx * max(0.0, cw - 2 * pad - side)))
    sy = int(round(y0 + pad + jy * max(0.0, area_h - 2 * pad - side)))
    word = None
    if obj.word:
        fs = _word_font_size(obj.word, cw - 2 * pad, (ch - area_h) - pad)
        mw, mh = _word_mask(obj.word, fs).size
        while mw > cw - 2 * pad and fs > 4:  # the font's bbox is approximate: fit the real mask
            fs -= 1
            mw, mh = _word_mask(obj.word, fs).size
        cx = sx + side / 2
        wx = int(round(min(max(cx - mw / 2, x0 + pad), x0 + cw - pad - mw)))
        shape_bottom = sy + (_shape_mask(obj.shape, side).getbbox() or (0, 0, side, side))[3]
        wy = int(round(shape_bottom + max(2.0, pad * 0.75)))
        word = (wx, wy, fs)
    return sx, sy, side, word


@lru_cache(maxsize=1024)
def _shape_mask(shape: str, side: int) -> Image.Image:
    """L mask (side x side) of ``shape``; treat as read-only (cached)."""
    im = Image.new("L", (side, side), 0)
    d = ImageDraw.Draw(im)
    m = side - 1
    c = m / 2
    if shape == "circle":
        d.ellipse((0, 0, m, m), fill=255)
    elif shape == "square":
        inset = round(side * 0.06)
        d.rectangle((inset, inset, m - inset, m - inset), fill=255)
    elif shape == "triangle":
        d.polygon([(c, 0), (m, m), (0, m)], fill=255)
    elif shape == "star":
        pts = []
        for k in range(10):
            r = c if k % 2 == 0 else c * 0.5
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((c + r * math.cos(a), c + 0.05 * side + r * math.sin(a)))
        d.polygon(pts, fill=255)
    elif shape == "cross":
        t = side * 0.17
        d.rectangle((c - t, 0, c + t, m), fill=255)
        d.rectangle((0, c - t, m, c + t), fill=255)
    elif shape == "ring":
        d.ellipse((0, 0, m, m), fill=255)
        r = c * 0.55
        d.ellipse((c - r, c - r, c + r, c + r), fill=0)
    elif shape == "diamond":
        d.polygon([(c, 0), (m, c), (c, m), (0, c)], fill=255)
    elif shape == "hexagon":
        d.polygon(
            [(c + c * math.cos(k * math.pi / 3), c + c * math.sin(k * math.pi / 3)) for k in range(6)],
            fill=255,
        )
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return im


def _alt_rgb(color: str) -> tuple[int, int, int]:
    r, g, b = COLORS[color]
    return (255, 255, 255) if 0.299 * r + 0.587 * g + 0.114 * b < 170 else (35, 35, 35)


@lru_cache(maxsize=1024)
def _object_patch(shape: str, color: str, texture: str, side: int) -> Image.Image:
    """RGB patch (side x side) for one object: colour + texture, with a 1 px solid rim."""
    rgb = COLORS[color]
    patch = Image.new("RGB", (side, side), rgb)
    if texture == "solid":
        return patch
    pat = Image.new("RGB", (side, side), rgb)
    d = ImageDraw.Draw(pat)
    alt = _alt_rgb(color)
    if texture == "striped":
        period = max(10, round(side * 0.22))  # horizontal period; lines run at 45 degrees
        w = max(2, round(period * 0.25))
        for off in range(-side, 2 * side, period):
            d.line([(off, 0), (off + side, side)], fill=alt, width=w)
    elif texture == "dotted":
        period = max(10, round(side * 0.22))
        r = max(2.0, period * 0.22)
        start = period / 2 + (side % period) / 2
        y = start
        while y < side:
            x = start
            while x < side:
                d.ellipse((x - r, y - r, x + r, y + r), fill=alt)
                x += period
            y += period
    else:
        raise ValueError(f"unknown texture {texture!r}")
    inner = _shape_mask(shape, side).filter(ImageFilter.MinFilter(3))
    patch.paste(pat, (0, 0), inner)
    return patch


def _norm(px: tuple[int, int, int, int], width: int, height: int) -> Box:
    """Pixel box -> [0,1] box, clipped to the image (pixels past the edge are never drawn)."""
    x0, y0, x1, y1 = max(0, px[0]), max(0, px[1]), min(width, px[2]), min(height, px[3])
    return (x0 / width, y0 / height, x1 / width, y1 / height)


def _place(obj: SceneObject, width: int, height: int, grid: int) -> SceneObject:
    """Return ``obj`` with ``box``/``word_box`` recomputed from the drawn masks."""
    sx, sy, side, word = _layout(obj, width, height, grid)
    bb = _shape_mask(obj.shape, side).getbbox() or (0, 0, side, side)
    box = _norm((sx + bb[0], sy + bb[1], sx + bb[2], sy + bb[3]), width, height)
    word_box = None
    if word is not None:
        wx, wy, fs = word
        mw, mh = _word_mask(obj.word, fs).size
        word_box = _norm((wx, wy, wx + mw, wy + mh), width, height)
    return dataclasses.replace(obj, box=box, word_box=word_box)


# --------------------------------------------------------------------------- scenes


def _background_text(spec: tuple) -> str:
    if spec[0] == "solid":
        return spec[1]
    _, direction, a, b = spec
    if direction == "vertical":
        return f"a gradient from {a} at the top to {b} at the bottom"
    return f"a gradient from {a} on the left to {b} on the right"


def _random_background(rng: random.Random) -> tuple:
    names = list(BACKGROUNDS)
    if rng.random() < _GRADIENT_P:
        a, b = rng.sample(names, 2)
        return ("gradient", rng.choice(("vertical", "horizontal")), a, b)
    return ("solid", rng.choice(names))


def _random_object(rng: random.Random, position: str, word: str | None) -> SceneObject:
    return SceneObject(
        shape=rng.choice(SHAPES),
        color=rng.choice(list(COLORS)),
        size=rng.choice(SIZES),
        texture=rng.choice(TEXTURES),
        position=position,
        word=word if rng.random() < _WORD_P else None,
        box=(0.0, 0.0, 1.0, 1.0),
        jitter=(rng.random(), rng.random()),
    )


def _dims(size: int, ratio: float) -> tuple[int, int]:
    if ratio >= 1:
        return size, max(1, round(size / ratio))
    return max(1, round(size * ratio)), size


def _finish(obj: SceneObject, width: int, height: int, grid: int) -> SceneObject:
    """Drop words in cells too small to hold them, then compute boxes."""
    if obj.word and height / grid < _MIN_WORD_CELL:
        obj = dataclasses.replace(obj, word=None)
    return _place(obj, width, height, grid)


def make_scene(seed: int, index: int, size: int = 384, grid: int = 3) -> Scene:
    """Build scene ``index`` of the world ``seed``; ``size`` is the long side in pixels.

    ``grid`` (3 or 2) is the layout the objects are placed in; the 3x3 world draws exactly what it
    drew before the parameter existed.
    """
    if grid not in GRID_POSITIONS:
        raise ValueError(f"grid must be one of {sorted(GRID_POSITIONS)}, got {grid}")
    cells_of = GRID_POSITIONS[grid]
    rng = random.Random(f"finevit-scene:{seed}:{index}")
    _, ratio = rng.choice(ASPECTS)
    width, height = _dims(size, ratio)
    spec = _random_background(rng)
    n = rng.randint(1, max_objects(grid))
    cells = sorted(rng.sample(range(len(cells_of)), n))
    words = rng.sample(WORDS, n)
    objects = tuple(
        _finish(_random_object(rng, cells_of[c], w), width, height, grid)
        for c, w in zip(cells, words, strict=True)
    )
    return Scene(seed, index, width, height, _background_text(spec), spec, objects, grid)


@lru_cache(maxsize=64)
def _background_image(spec: tuple, width: int, height: int) -> Image.Image:
    if spec[0] == "solid":
        return Image.new("RGB", (width, height), BACKGROUNDS[spec[1]])
    _, direction, a, b = spec
    ca = np.array(BACKGROUNDS[a], dtype=np.float32)
    cb = np.array(BACKGROUNDS[b], dtype=np.float32)
    n = height if direction == "vertical" else width
    t = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None]
    line = np.rint(ca * (1 - t) + cb * t).astype(np.uint8)
    if direction == "vertical":
        arr = np.broadcast_to(line[:, None, :], (height, width, 3))
    else:
        arr = np.broadcast_to(line[None, :, :], (height, width, 3))
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def render_scene(scene: Scene) -> Image.Image:
    """Render ``scene`` to an RGB image of exactly ``scene.width x scene.height`` (deterministic)."""
    canvas = _background_image(scene.background_spec, scene.width, scene.height).copy()
    for obj in scene.objects:
        sx, sy, side, word = _layout(obj, scene.width, scene.height, scene.grid)
        canvas.paste(
            _object_patch(obj.shape, obj.color, obj.texture, side), (sx, sy), _shape_mask(obj.shape, side)
        )
        if word is not None:
            wx, wy, fs = word
            mask = _word_mask(obj.word, fs)
            canvas.paste(TEXT_RGB, (wx, wy, wx + mask.width, wy + mask.height), mask)
    return canvas


# --------------------------------------------------------------------------- text


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(shape: str, k: int) -> str:
    return shape if k == 1 else _PLURAL.get(shape, shape + "s")


def _count_phrase(k: int, shape: str) -> str:
    return _a(shape) if k == 1 else f"{_NUM[k]} {_plural(shape, k)}"


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


_ALT_GENERIC: tuple[str, ...] = (
    "shapes",
    "abstract art",
    "colorful design",
    "image",
    "geometric pattern wallpaper",
    "untitled",
    "modern art print",
    "kids shapes clipart",
    "stock illustration",
    "background",
    "colorful geometric shapes",
    "graphic design inspiration",
    "free vector download",
    "logo ideas",
    "Abstract Poster",
    "IMG_{num}.jpg",
    "minimalist wall art",
    "screenshot",
)


def alt_text(scene: Scene) -> str:
    """Web-style alt-text: short, vague, sometimes wrong or off-topic (deterministic per scene)."""
    rng = random.Random(f"finevit-alt:{scene.seed}:{scene.index}")
    roll = rng.random()
    n = len(scene.objects)
    words = [o.word for o in scene.objects if o.word]
    if roll < 0.25 and n:
        k = n if rng.random() < 0.5 else max(1, n + rng.choice((-2, -1, 1, 2)))
        return rng.choice(("a picture with {k} shapes", "{k} shapes", "{k} colorful shapes")).format(k=k)
    if roll < 0.45 and n:
        obj = rng.choice(scene.objects)
        color = obj.color if rng.random() < 0.7 else rng.choice(list(COLORS))
        return rng.choice(("{c} {s}", "{s} icon", "{c} {s} clipart", "cute {s}")).format(c=color, s=obj.shape)
    if roll < 0.55 and words:
        return rng.choice(("{w} sign", "{w}", "{w} logo")).format(w=rng.choice(words))
    return rng.choice(_ALT_GENERIC).format(num=rng.randint(1000, 9999))


def _desc(o: SceneObject) -> str:
    return f"{o.size} {o.color} {o.texture} {o.shape}"


def _refs(objects: tuple[SceneObject, ...]) -> list[str]:
    """Shortest unambiguous noun phrase for each object."""
    keys = (
        lambda o: f"{o.color} {o.shape}",
        lambda o: f"{o.size} {o.color} {o.shape}",
        lambda o: f"{o.size} {o.color} {o.texture} {o.shape}",
    )
    out = []
    for o in objects:
        for key in keys:
            if sum(key(p) == key(o) for p in objects) == 1:
                out.append(key(o))
                break
        else:
            out.append(f"{o.color} {o.shape} in the {o.position}")
    return out


def _relation(a: SceneObject, b: SceneObject) -> str:
    ra, ca = divmod(POSITIONS.index(a.position), 3)
    rb, cb = divmod(POSITIONS.index(b.position), 3)
    parts = []
    if ra != rb:
        parts.append("above" if ra < rb else "below")
    if ca != cb:
        parts.append("to the left of" if ca < cb else "to the right of")
    return " and ".join(parts)


_OBJ_TEMPLATES: tuple[str, ...] = (
    "In the {pos} there is {a_size} {color} {shape} with a {texture} fill.",
    "{A_size} {texture} {color} {shape} sits in the {pos}.",
    "The {pos} holds {a_color} {shape}; it is {size} and {texture}.",
    "There is {a_size} {color} {shape} in the {pos}, {texture} in style.",
    "In the {pos}, we see {a_size} {texture} {color} {shape}.",
)
_WORD_TEMPLATES: tuple[str, ...] = (
    ' The word "{w}" is written in black beneath it.',
    ' Below it, the word "{w}" is printed in black capital letters.',
    ' Underneath, black text reads "{w}".',
)
_REL_TEMPLATES: tuple[str, ...] = (
    "The {a} is {rel} the {b}.",
    "The {a} appears {rel} the {b}.",
    "The {a} is placed {rel} the {b}.",
)


def dense_caption(scene: Scene) -> str:
    """Exact dense description: counts, every object with all attributes, relations, words, background."""
    rng = random.Random(f"finevit-caption:{scene.seed}:{scene.index}")
    objs = scene.objects
    n = len(objs)
    bg = f"a plain {scene.background} background" if scene.background_spec[0] == "solid" else scene.background
    shape_counts: dict[str, int] = {}
    for o in objs:
        shape_counts[o.shape] = shape_counts.get(o.shape, 0) + 1
    summary = _join([_count_phrase(k, s) for s, k in shape_counts.items()])
    intro = rng.randrange(3)
    if n == 0:
        sentences = [f"The image is empty: just {bg}."]
    elif intro == 0:
        sentences = [f"The image shows {_NUM[n]} object{'s' if n > 1 else ''} on {bg}: {summary}."]
    elif intro == 1:
        head = f"{_cap(_NUM[n])} shapes are arranged" if n > 1 else "A single shape is placed"
        sentences = [f"{head} on {bg}: {summary}."]
    else:
        sentences = [
            f"This picture contains {_NUM[n]} object{'s' if n > 1 else ''} ({summary}) set against {bg}."
        ]
    color_counts: dict[str, int] = {}
    for o in objs:
        color_counts[o.color] = color_counts.get(o.color, 0) + 1
    for color, k in color_counts.items():
        if k > 1:
            sentences.append(
                f"{_cap(_NUM[k])} of the objects are {color}." if k < n else f"All of them are {color}."
            )
    for o in objs:
        t = rng.choice(_OBJ_TEMPLATES).format(
            pos=o.position,
            size=o.size,
            color=o.color,
            shape=o.shape,
            texture=o.texture,
            a_size=_a(o.size),
            A_size=_cap(_a(o.size)),
            a_color=_a(o.color),
        )
        if o.word:
            t += rng.choice(_WORD_TEMPLATES).format(w=o.word)
        sentences.append(t)
    refs = _refs(objs)
    rel_pairs = list(range(n - 1))
    if len(rel_pairs) > 3:
        rel_pairs = sorted(rng.sample(rel_pairs, 3))
    for i in rel_pairs:
        rel = _relation(objs[i], objs[i + 1])
        sentences.append(rng.choice(_REL_TEMPLATES).format(a=refs[i], rel=rel, b=refs[i + 1]))
    words = [f'"{o.word}"' for o in objs if o.word]
    if n == 1:
        sentences.append("It is the only object in the image.")
    if len(words) == 1:
        sentences.append(f"The only text in the image is the word {words[0]}.")
    elif words:
        sentences.append(f"The words {_join(words)} appear in the image.")
    else:
        sentences.append("There is no text in the image.")
    return " ".join(sentences)


def region_annotations(scene: Scene) -> list[dict]:
    """One region per object (label = shape) and one per rendered word (label ``"text"``)."""
    out: list[dict] = []
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        out.append(
            {
                "x0": x0,
                "y0": y0,
                "x1": x1,
                "y1": y1,
                "caption": f"a {_desc(o)} in the {o.position}",
                "label": o.shape,
            }
        )
        if o.word and o.word_box:
            x0, y0, x1, y1 = o.word_box
            cap = f'the word "{o.word}" in black letters below the {o.color} {o.shape} in the {o.position}'
            out.append({"x0": x0, "y0": y0, "x1": x1, "y1": y1, "caption": cap, "label": "text"})
    return out


# --------------------------------------------------------------------------- hard negatives


def applicable_perturbations(scene: Scene) -> list[str]:
    """The perturbation kinds that :func:`perturb` accepts for ``scene``."""
    out = []
    for kind in PERTURBATIONS:
        if kind == "swap_color" and len({o.color for o in scene.objects}) < 2:
            continue
        if kind == "word" and not any(o.word for o in scene.objects):
            continue
        if kind in ("recolor", "shape", "size", "texture", "move") and not scene.objects:
            continue
        if kind == "move" and len(scene.objects) >= len(GRID_POSITIONS[scene.grid]):
            continue  # no free cell to move an object to
        out.append(kind)
    return out


def _other(rng: random.Random, options, current):
    return rng.choice([x for x in options if x != current])


def perturb(scene: Scene, kind: str, seed: int = 0) -> Scene:
    """Hard negative: ``scene`` with exactly one attribute changed (``kind`` from PERTURBATIONS)."""
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; expected one of {PERTURBATIONS}")
    if kind not in applicable_perturbations(scene):
        raise ValueError(f"perturbation {kind!r} is not applicable to scene {scene.seed}:{scene.index}")
    rng = random.Random(f"finevit-perturb:{seed}:{kind}:{scene.seed}:{scene.index}")
    w, h, grid, cells_of = scene.width, scene.height, scene.grid, GRID_POSITIONS[scene.grid]
    objs = list(scene.objects)
    if kind == "background":
        spec = scene.background_spec
        while spec == scene.background_spec:
            spec = _random_background(rng)
        return dataclasses.replace(scene, background=_background_text(spec), background_spec=spec)
    if kind == "swap_color":
        pairs = [
            (i, j)
            for i in range(len(objs))
            for j in range(i + 1, len(objs))
            if objs[i].color != objs[j].color
        ]
        i, j = rng.choice(pairs)
        objs[i], objs[j] = (
            dataclasses.replace(objs[i], color=objs[j].color),
            dataclasses.replace(objs[j], color=objs[i].color),
        )
    elif kind == "count":
        if len(objs) >= max_objects(grid) or (len(objs) > 1 and rng.random() < 0.5):
            del objs[rng.randrange(len(objs))]
        else:
            used = {o.position for o in objs}
            pos = rng.choice([p for p in cells_of if p not in used])
            taken = {o.word for o in objs}
            word = rng.choice([x for x in WORDS if x not in taken])
            objs.append(_finish(_random_object(rng, pos, word), w, h, grid))
            objs.sort(key=lambda o: POSITIONS.index(o.position))
    else:
        candidates = [i for i, o in enumerate(objs) if kind != "word" or o.word]
        i = rng.choice(candidates)
        o = objs[i]
        if kind == "recolor":
            o = dataclasses.replace(o, color=_other(rng, list(COLORS), o.color))
        elif kind == "shape":
            o = dataclasses.replace(o, shape=_other(rng, SHAPES, o.shape))
        elif kind == "size":
            o = dataclasses.replace(o, size=_other(rng, SIZES, o.size))
        elif kind == "texture":
            o = dataclasses.replace(o, texture=_other(rng, TEXTURES, o.texture))
        elif kind == "move":
            used = {p.position for p in objs}
            o = dataclasses.replace(o, position=rng.choice([p for p in cells_of if p not in used]))
        elif kind == "word":
            taken = {p.word for p in objs}
            o = dataclasses.replace(o, word=rng.choice([x for x in WORDS if x not in taken]))
        objs[i] = _place(o, w, h, grid)
        objs.sort(key=lambda p: POSITIONS.index(p.position))
    return dataclasses.replace(scene, objects=tuple(objs))


# --------------------------------------------------------------------------- URI

_URI_DEFAULTS = {"n": 1000, "seed": 0, "size": 384, "grid": 3}


def world_query(seed: int, size: int, grid: int = 3) -> str:
    """The URI query naming one world, ``seed=S&size=W[&grid=G]`` (the default grid left out, so
    the 3x3 world's URIs read as they did before the parameter existed)."""
    return f"seed={seed}&size={size}" + (f"&grid={grid}" if grid != _URI_DEFAULTS["grid"] else "")


_INT_RE = re.compile(r"[+-]?\d+")


def parse_synthetic_uri(uri: str) -> dict:
    """Parse ``synthetic://scenes?n=N&seed=S&size=W&grid=G`` into ``{"n", "seed", "size", "grid"}``
    (with defaults)."""
    parts = urlsplit(uri)
    if parts.scheme != "synthetic":
        raise ValueError(f"not a synthetic URI (scheme must be 'synthetic'): {uri!r}")
    if parts.netloc != "scenes" or parts.path not in ("", "/"):
        kind = parts.netloc + parts.path
        raise ValueError(f"unknown synthetic kind {kind!r} in {uri!r}; only 'scenes' is supported")
    out = dict(_URI_DEFAULTS)
    seen: set[str] = set()
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _URI_DEFAULTS:
            raise ValueError(f"unknown parameter {key!r} in {uri!r}; expected n, seed, size, grid")
        if key in seen:
            raise ValueError(f"parameter {key!r} given twice in {uri!r}")
        seen.add(key)
        if not _INT_RE.fullmatch(value.strip()):
            raise ValueError(f"parameter {key!r} must be an integer, got {value!r}")
        out[key] = int(value)
    if out["n"] < 1:
        raise ValueError(f"parameter 'n' must be >= 1, got {out['n']}")
    if not 32 <= out["size"] <= 4096:
        raise ValueError(f"parameter 'size' must be in [32, 4096], got {out['size']}")
    if out["grid"] not in GRID_POSITIONS:
        raise ValueError(f"parameter 'grid' must be one of {sorted(GRID_POSITIONS)}, got {out['grid']}")
    return out
