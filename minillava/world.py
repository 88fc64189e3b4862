"""The synthetic world: scenes of coloured shapes, referring expressions, VQA questions and captions.

Everything is a pure function of a seed. A scene is a few non-overlapping shapes on a textured
background. Referring expressions come in RefCOCO's three kinds:
  attribute  "the red circle", "the square", "the blue object"
  relational "the square left of the blue cross"
  absolute   "the triangle at the top", "the object on the left"
and always pick out exactly one object (`resolve` reads an expression back and checks it). VQA
questions (colour, shape, count, existence) never need a location, and captions never mention one,
so the contrastive stage gives the vision tower no reason to keep patch positions.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 80, 220),
    "yellow": (230, 205, 40), "purple": (145, 60, 185),
}
SHAPES = ("circle", "square", "triangle", "cross")
RELATIONS = ("left of", "right of", "above", "below")
LOCATIONS = ("at the top", "at the bottom", "on the left", "on the right")
# Words that place an object; captions and VQA questions must contain none of them.
LOCATION_WORDS = frozenset({"left", "right", "top", "bottom", "above", "below", "middle", "center", "centre",
                            "upper", "lower", "near", "next", "beside", "corner", "side"})
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
# Scenes with seeds below this are the evaluation split's; training draws its scenes above it.
TRAIN_SEED_OFFSET = 1_000_000
# A relation or location is only stated when the objects' centres differ by this many pixels, so no
# expression hinges on a one-pixel difference the model cannot see.
CLEAR_MARGIN = 6.0


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, x2/y2 exclusive

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class Scene:
    size: int
    objects: tuple[SceneObject, ...]
    seed: int

    def render(self) -> Image.Image:
        return render(self)


@dataclass(frozen=True)
class Referring:
    text: str
    target: int  # index into scene.objects
    kind: str  # attribute | relational | absolute


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    kind: str  # color | shape | count | exist


# ---------------------------------------------------------------------------------------- scenes
def make_scene(seed: int, size: int = 64, *, min_objects: int = 2, max_objects: int = 3,
               min_side: int | None = None, max_side: int | None = None) -> Scene:
    """Place 2-3 shapes (sides ~30-46% of the image, 2.4-3.7 patches of 8 px at 64 px) at least 2 px apart.

    Objects span several patches, as a RefCOCO object spans several of CLIP's: a shape must be legible
    from patch features, and a box must be reachable to IoU 0.5 from where those patches are.
    """
    rng = random.Random(seed)
    min_side = min_side or round(0.30 * size)
    max_side = max_side or round(0.46 * size)
    count = rng.randint(min_objects, max_objects)
    objects: list[SceneObject] = []
    attempts = 0
    while len(objects) < count:
        attempts += 1
        if attempts > 200:  # the first objects left no room: start the layout again
            objects, attempts = [], 0
        width = rng.randint(min_side, max_side)
        height = max(min_side, min(max_side, round(width * rng.uniform(0.75, 1.33))))
        x1, y1 = rng.randint(0, size - width), rng.randint(0, size - height)
        box = (x1, y1, x1 + width, y1 + height)
        if all(_apart(box, other.box, gap=2) for other in objects):
            objects.append(SceneObject(rng.choice(SHAPES), rng.choice(list(COLORS)), box))
    return Scene(size=size, objects=tuple(objects), seed=seed)


def shape_variants(scene: Scene, count: int, rng: random.Random) -> list[Scene]:
    """`scene` then `count - 1` copies (places, colours, background kept) whose shape tuples all differ.

    Distinct, so that no two scenes of a hard-negative group share a caption's content.
    """
    own = tuple(obj.shape for obj in scene.objects)
    others = [shapes for shapes in itertools.product(SHAPES, repeat=len(own)) if shapes != own]
    if count - 1 > len(others):
        raise ValueError(f"a scene of {len(scene.objects)} objects has only {len(others) + 1} shape variants, "
                         f"not {count}")
    return [scene] + [Scene(size=scene.size, seed=scene.seed,
                            objects=tuple(SceneObject(shape, obj.color, obj.box)
                                          for shape, obj in zip(shapes, scene.objects)))
                      for shapes in rng.sample(others, count - 1)]


def _apart(a: tuple[int, ...], b: tuple[int, ...], gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Boolean (height, width) mask of a shape that touches all four sides of its box."""
    y, x = np.mgrid[0:height, 0:width].astype(float)
    u, v = (x + 0.5) / width, (y + 0.5) / height  # 0..1 inside the box
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25 + 1e-9 + 0.02
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "triangle":  # apex at the top centre, base along the bottom
        return np.abs(u - 0.5) <= 0.5 * v + 0.5 / width
    if shape == "cross":
        return (np.abs(u - 0.5) <= 1 / 6 + 0.5 / width) | (np.abs(v - 0.5) <= 1 / 6 + 0.5 / height)
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def render(scene: Scene) -> Image.Image:
    """RGB image: a tinted, noisy background with each shape filled in a jittered, noisy colour."""
    rng = np.random.default_rng(scene.seed)
    base = rng.integers(95, 165) + rng.integers(-12, 13, size=3)
    canvas = np.broadcast_to(base, (scene.size, scene.size, 3)).astype(float)
    canvas = canvas + rng.normal(0, 7, size=canvas.shape)
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        mask = shape_mask(obj.shape, x2 - x1, y2 - y1)
        color = np.array(COLORS[obj.color], dtype=float) + rng.integers(-18, 19, size=3)
        patch = color + rng.normal(0, 6, size=(y2 - y1, x2 - x1, 3))
        region = canvas[y1:y2, x1:x2]
        region[mask] = patch[mask]
    return Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------- descriptions
@dataclass(frozen=True)
class Description:
    """"the [colour] shape", "the colour object" or "the object"."""

    color: str | None
    shape: str | None

    def text(self) -> str:
        return " ".join(word for word in ("the", self.color, self.shape or "object") if word)

    def matches(self, obj: SceneObject) -> bool:
        return (self.color in (None, obj.color)) and (self.shape in (None, obj.shape))


def _descriptions_of(obj: SceneObject) -> list[Description]:
    return [Description(obj.color, obj.shape), Description(None, obj.shape), Description(obj.color, None),
            Description(None, None)]


def _related(a: SceneObject, b: SceneObject, relation: str, margin: float = 0.0) -> bool:
    """Whether a is `relation` b, by their centres (image y grows downwards)."""
    (ax, ay), (bx, by) = a.center, b.center
    return {"left of": ax < bx - margin, "right of": ax > bx + margin,
            "above": ay < by - margin, "below": ay > by + margin}[relation]


def _extreme(objects: list[SceneObject], location: str) -> list[SceneObject]:
    """The objects furthest towards `location` (several on a tie)."""
    key = {"at the top": lambda o: o.center[1], "at the bottom": lambda o: -o.center[1],
           "on the left": lambda o: o.center[0], "on the right": lambda o: -o.center[0]}[location]
    best = min(key(o) for o in objects)
    return [o for o in objects if key(o) == best]


def _location_margin(objects: list[SceneObject], target: SceneObject, location: str) -> float:
    axis = 1 if location in ("at the top", "at the bottom") else 0
    sign = 1 if location in ("at the top", "on the left") else -1
    others = [sign * (o.center[axis] - target.center[axis]) for o in objects if o is not target]
    return min(others, default=float("inf"))


# ----------------------------------------------------------------------------------- expressions
def referring_expressions(scene: Scene, rng: random.Random) -> list[Referring]:
    """Every kind of expression that can pick out some object unambiguously, one per (object, kind)."""
    found = []
    for index, target in enumerate(scene.objects):
        for kind, make in (("attribute", _attribute), ("relational", _relational), ("absolute", _absolute)):
            options = make(scene, target)
            if options:
                found.append(Referring(rng.choice(options), index, kind))
    return found


def _attribute(scene: Scene, target: SceneObject) -> list[str]:
    return [d.text() for d in _descriptions_of(target)[:3]
            if sum(d.matches(o) for o in scene.objects) == 1]


def _relational(scene: Scene, target: SceneObject) -> list[str]:
    options = []
    for desc in _descriptions_of(target)[:3]:
        same = [o for o in scene.objects if desc.matches(o)]
        if len(same) < 2:  # the relation must be needed, as in RefCOCO's hard cases
            continue
        for anchor in scene.objects:
            if anchor is target:
                continue
            anchor_desc = next((d for d in _descriptions_of(anchor)[:3] if not d.matches(target)
                                and sum(d.matches(o) for o in scene.objects) == 1), None)
            if anchor_desc is None:
                continue
            for relation in RELATIONS:
                holds = [o for o in same if o is not anchor and _related(o, anchor, relation)]
                others = [o for o in same if o is not target and o is not anchor]
                clear = _related(target, anchor, relation, CLEAR_MARGIN) and all(
                    not _related(o, anchor, relation, -CLEAR_MARGIN) for o in others)
                if holds == [target] and clear:
                    options.append(f"{desc.text()} {relation} {anchor_desc.text()}")
    return options


def _absolute(scene: Scene, target: SceneObject) -> list[str]:
    options = []
    for desc in _descriptions_of(target):
        same = [o for o in scene.objects if desc.matches(o)]
        if len(same) < 2:
            continue
        for location in LOCATIONS:
            if _extreme(same, location) == [target] and _location_margin(same, target, location) >= CLEAR_MARGIN:
                options.append(f"{desc.text()} {location}")
    return options


_DESC = r"the (?:(" + "|".join(COLORS) + r") )?(" + "|".join(SHAPES) + r"|object)"
_EXPRESSION = re.compile(rf"^{_DESC}(?: ({'|'.join(RELATIONS)}) {_DESC})?(?: ({'|'.join(LOCATIONS)}))?$")


def resolve(expression: str, scene: Scene) -> list[int]:
    """The indices of the objects `expression` can refer to, read from its words alone.

    The generator's unambiguity claim, checked independently: a good expression resolves to one.
    """
    match = _EXPRESSION.match(expression)
    if match is None:
        raise ValueError(f"not an expression of the synthetic world: {expression!r}")
    color, shape, relation, anchor_color, anchor_shape, location = match.groups()
    desc = Description(color, None if shape == "object" else shape)
    candidates = [o for o in scene.objects if desc.matches(o)]
    if relation:
        anchor_desc = Description(anchor_color, None if anchor_shape == "object" else anchor_shape)
        anchors = [o for o in scene.objects if anchor_desc.matches(o)]
        if len(anchors) != 1:
            return []
        candidates = [o for o in candidates if o is not anchors[0] and _related(o, anchors[0], relation)]
    if location and candidates:
        candidates = _extreme(candidates, location)
    return [scene.objects.index(o) for o in candidates]


# ------------------------------------------------------------------------------ questions, captions
def vqa_questions(scene: Scene, rng: random.Random) -> list[Question]:
    """One question of each answerable kind; none needs to know where anything is."""
    objects = scene.objects
    questions = []
    unique_shape = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
    if unique_shape:
        obj = rng.choice(unique_shape)
        questions.append(Question(f"what color is the {obj.shape}?", obj.color, "color"))
    unique_color = [o for o in objects if sum(p.color == o.color for p in objects) == 1]
    if unique_color:
        obj = rng.choice(unique_color)
        questions.append(Question(f"what shape is the {obj.color} object?", obj.shape, "shape"))
    if rng.random() < 0.5:
        shape = rng.choice(SHAPES)
        count = sum(o.shape == shape for o in objects)
        questions.append(Question(f"how many {shape}s are there?", str(count), "count"))
    else:
        color = rng.choice(list(COLORS))
        questions.append(Question(f"how many {color} objects are there?",
                                  str(sum(o.color == color for o in objects)), "count"))
    color, shape = (rng.choice(list(COLORS)), rng.choice(SHAPES))
    if rng.random() < 0.5:  # half the time ask about an object that is there
        present = rng.choice(objects)
        color, shape = present.color, present.shape
    exists = any(o.color == color and o.shape == shape for o in objects)
    questions.append(Question(f"is there a {color} {shape}?", "yes" if exists else "no", "exist"))
    return questions


CELL_ROWS = ("top", "", "bottom")
CELL_COLUMNS = ("left", "", "right")


def cell_name(obj: SceneObject, size: int) -> str:
    """The 3x3 cell that holds the object's centre: "top left", "top", ..., "middle", ..., "bottom right"."""
    x, y = obj.center
    row, column = min(2, int(3 * y / size)), min(2, int(3 * x / size))
    return " ".join(word for word in (CELL_ROWS[row], CELL_COLUMNS[column]) if word) or "middle"


def where_questions(scene: Scene, rng: random.Random) -> list[Question]:
    """Training only: "where is the red circle?" -> its cell, for each object that an attribute names.

    A one-word place for an object found by its colour and shape; `minillava.train --where-fraction`
    mixes it in to test whether it teaches REC to follow the words (it did not: see `batch_counts`).
    """
    questions = []
    for obj in scene.objects:
        options = _attribute(scene, obj)
        if options:
            questions.append(Question(f"where is {rng.choice(options)}?", cell_name(obj, scene.size), "where"))
    return questions


def caption(scene: Scene, rng: random.Random) -> str:
    """"a red circle, a blue square and a green cross", in a random order that carries no position."""
    names = [f"a {o.color} {o.shape}" for o in scene.objects]
    rng.shuffle(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def box_answer(box: tuple[float, float, float, float], size: int, box_format: str = "normalized") -> str:
    """A box as the model family answers it: LLaVA-1.5's [x1, y1, x2, y2] as fractions of the image, two
    decimals (`normalized`), or Qwen2-VL's <|box_start|>(x1,y1),(x2,y2)<|box_end|> in thousandths
    (`normalized1000`)."""
    if box_format == "normalized":
        return "[" + ", ".join(f"{value / size:.2f}" for value in box) + "]"
    if box_format == "normalized1000":
        x1, y1, x2, y2 = (round(1000 * value / size) for value in box)
        return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"
    raise ValueError(f"box format {box_format!r}: the world writes 'normalized' or 'normalized1000'")
