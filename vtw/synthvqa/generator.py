"""Seeded generator of synthetic visual questions whose answers need the image.

Every item is a scene of flat coloured shapes drawn with PIL on a light background, and one question about it.
Objects sit on the 12 x 12 grid of 16 px cells that the tiny LLaVA's vision tower cuts the image into (like the cells
of Sort-of-CLEVR): each fills a block of 1 x 1, 2 x 2 or 3 x 3 cells (12, 28 or 44 px shapes), and objects never
touch. That keeps perception easy enough for a vision tower trained for a minute on a CPU; the questions still need
the image, and the decoder still has to find, compare and count objects among 144 vision tokens.

| kind       | question                                   | scene             | answers             |
|------------|--------------------------------------------|-------------------|---------------------|
| `color`    | What color is the {shape}?                 | 1-2 objects       | one of `COLORS` (6) |
| `shape`    | What shape is the {color} object?          | 1-2 objects       | one of `SHAPES` (4) |
| `count`    | How many objects are there?                | 1-5 objects       | one of `COUNTS` (5) |
| `position` | What color is the {direction} object?      | 2 objects         | one of `COLORS` (6) |
| `size`     | What color is the {larger,smaller} object? | 2 objects         | one of `COLORS` (6) |

The prompt is the question followed by `SHORT_SUFFIX`; the answer is one word. Every item also carries
`NUM_CHOICES` = 4 candidate answers (the right one and three others from its answer set, in random order) for the
multiple-choice form, which scores each candidate's likelihood. Answers are uniform over their answer set whatever
the question's wording, so a model that does not see the image is at chance: 1/6, 1/4 or 1/5 per kind for the short
answer (about 18% over the mix) and 1/4 for multiple choice.

Determinism: item `i` of a split is generated from its own `random.Random(seed)` with `seed = SPLIT_SEEDS[split] +
i`; the seed ranges of the splits are disjoint, so train and test never share a seed. The same seed always gives the
same scene, question and PNG bytes (for a given Pillow version; only non-antialiased primitives are used).
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 180),
    "orange": (245, 135, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COUNTS: tuple[str, ...] = ("1", "2", "3", "4", "5")
KINDS: tuple[str, ...] = ("color", "shape", "count", "position", "size")
DIRECTIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
COMPARISONS: tuple[str, ...] = ("larger", "smaller")
QUESTIONS: dict[str, str] = {
    "color": "What color is the {}?",
    "shape": "What shape is the {} object?",
    "count": "How many objects are there?",
    "position": "What color is the {} object?",
    "size": "What color is the {} object?",
}
"""The question of each kind; `{}` takes the word that names the object asked about (one of `REFERENT_WORDS`)."""
REFERENT_WORDS: dict[str, tuple[str, ...]] = {
    "color": SHAPES,
    "shape": tuple(COLORS),
    "position": DIRECTIONS,
    "size": COMPARISONS,
}
ANSWER_SETS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": COUNTS,
    "position": tuple(COLORS),
    "size": tuple(COLORS),
}
"""The possible answers of each kind (answers are uniform over them)."""
MAX_REFERENCE_OBJECTS = 2
"""Colour and shape questions are asked about scenes of at most this many objects."""
NUM_CHOICES = 4

IMAGE_SIZE = 192
"""Side of the square canvas in pixels (the tiny LLaVA's vision tower sees 12 x 12 patches of 16 px)."""

SHORT_SUFFIX = "Answer the question using a single word."

SPLIT_SEEDS: dict[str, int] = {"train": 0, "test": 1_000_000_000, "validation": 2_000_000_000}
"""First seed of each split; a split holds at most `SPLIT_CAPACITY` items, so the seed ranges are disjoint."""
SPLIT_CAPACITY = 1_000_000_000

Kind = Literal["color", "shape", "count", "position", "size"]

_BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((245, 245, 245), (235, 235, 225), (225, 232, 240), (240, 230, 235))
CELL = 16
"""Side of a grid cell in pixels (= the vision tower's patch size)."""
GRID = IMAGE_SIZE // CELL
_INSET = 2  # free pixels between a shape and the border of its block of cells


@dataclass(frozen=True)
class SceneObject:
    """One flat shape; `(cx, cy)` is the centre of its `size` x `size` bounding box, in pixels."""

    shape: str
    color: str
    cx: int
    cy: int
    size: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), inclusive pixel bounds."""
        half = self.size // 2
        return (self.cx - half, self.cy - half, self.cx - half + self.size - 1, self.cy - half + self.size - 1)


@dataclass(frozen=True)
class Scene:
    """A canvas of `IMAGE_SIZE` x `IMAGE_SIZE` pixels with non-overlapping objects."""

    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]

    def render(self) -> Image.Image:
        """Draw the scene: an RGB PIL image of `IMAGE_SIZE` x `IMAGE_SIZE`."""
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), self.background)
        draw = ImageDraw.Draw(image)
        for obj in self.objects:
            draw_object(draw, obj, COLORS[obj.color])
        return image

    def object_map(self) -> Image.Image:
        """Which object covers each pixel: an "L" image of `IMAGE_SIZE` x `IMAGE_SIZE`, 0 = background, `i + 1` =
        `objects[i]` (drawn with the same primitives as `render`)."""
        image = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        draw = ImageDraw.Draw(image)
        for index, obj in enumerate(self.objects):
            draw_object(draw, obj, index + 1)
        return image


@dataclass(frozen=True)
class SynthItem:
    """One visual question.

    `prompt` is the user text shown with the image (without the `<image>` placeholder): the question and
    `SHORT_SUFFIX`; `answer` is the one-word answer; `choices` are `NUM_CHOICES` candidate answers in random order,
    `answer` among them.
    """

    item_id: str
    split: str
    seed: int
    kind: Kind
    question: str
    prompt: str
    answer: str
    choices: tuple[str, ...]
    scene: Scene

    def image(self) -> Image.Image:
        """The item's image, an RGB PIL image of `IMAGE_SIZE` x `IMAGE_SIZE`."""
        return self.scene.render()

    def png_bytes(self) -> bytes:
        """The image as PNG bytes (deterministic for a given Pillow version)."""
        buffer = io.BytesIO()
        self.image().save(buffer, format="PNG", optimize=False)
        return buffer.getvalue()


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, fill: tuple[int, int, int] | int) -> None:
    """Draw `obj` (one of `SHAPES`, inside its box) with `fill` (an RGB colour, or an index on an "L" image)."""
    left, top, right, bottom = obj.box
    if obj.shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif obj.shape == "square":
        inset = obj.size // 10
        draw.rectangle((left + inset, top + inset, right - inset, bottom - inset), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(obj.cx, top), (right, bottom), (left, bottom)], fill=fill)
    elif obj.shape == "cross":
        arm = max(obj.size // 6, 3)
        draw.rectangle((obj.cx - arm, top, obj.cx + arm, bottom), fill=fill)
        draw.rectangle((left, obj.cy - arm, right, obj.cy + arm), fill=fill)
    else:  # pragma: no cover - SceneObject is only built with SHAPES
        raise ValueError(f"unknown shape {obj.shape!r}; allowed: {SHAPES}")


def _place(rng: random.Random, spans: list[int]) -> list[tuple[int, int]] | None:
    """Top-left cells (column, row) for square blocks of `spans` cells that neither overlap nor touch (one free cell
    between blocks); None when random placement fails."""
    placed: list[tuple[int, int, int]] = []
    for span in spans:
        for _ in range(200):
            col, row = rng.randint(0, GRID - span), rng.randint(0, GRID - span)
            if all(col + span < c or c + s < col or row + span < r or r + s < row for c, r, s in placed):
                placed.append((col, row, span))
                break
        else:
            return None
    return [(col, row) for col, row, _ in placed]


def _scene(rng: random.Random, shapes: list[str], colors: list[str], spans: list[int]) -> Scene | None:
    cells = _place(rng, spans)
    if cells is None:
        return None
    objects = []
    for shape, color, span, (col, row) in zip(shapes, colors, spans, cells, strict=True):
        size = span * CELL - 2 * _INSET
        left, top = col * CELL + _INSET, row * CELL + _INSET
        objects.append(SceneObject(shape=shape, color=color, cx=left + size // 2, cy=top + size // 2, size=size))
    return Scene(objects=tuple(objects), background=rng.choice(_BACKGROUNDS))


def _question(rng: random.Random, kind: Kind) -> tuple[str | None, str, Scene] | None:
    """(the word naming the object asked about (None for counting), answer word, scene) for one attempt; None when the
    sampled scene is unusable."""
    color_names = list(COLORS)
    if kind == "color":
        n = rng.randint(1, MAX_REFERENCE_OBJECTS)
        shapes = rng.sample(SHAPES, n)
        colors = [rng.choice(color_names) for _ in range(n)]
        scene = _scene(rng, shapes, colors, [rng.randint(1, 3) for _ in range(n)])
        # the asked-for object is the first one sampled: its colour is uniform over COLORS
        return (shapes[0], colors[0], scene) if scene else None
    if kind == "shape":
        n = rng.randint(1, MAX_REFERENCE_OBJECTS)
        colors = rng.sample(color_names, n)
        shapes = [rng.choice(SHAPES) for _ in range(n)]
        scene = _scene(rng, shapes, colors, [rng.randint(1, 3) for _ in range(n)])
        return (colors[0], shapes[0], scene) if scene else None
    if kind == "count":
        n = rng.randint(1, len(COUNTS))
        shapes = [rng.choice(SHAPES) for _ in range(n)]
        colors = [rng.choice(color_names) for _ in range(n)]
        scene = _scene(rng, shapes, colors, [rng.randint(1, 2) for _ in range(n)])
        return (None, COUNTS[n - 1], scene) if scene else None
    if kind == "position":
        colors = rng.sample(color_names, 2)
        shapes = [rng.choice(SHAPES) for _ in range(2)]
        direction = rng.choice(DIRECTIONS)
        scene = _scene(rng, shapes, colors, [rng.randint(1, 3) for _ in range(2)])
        if scene is None:
            return None
        target = position_target(scene, direction)
        return (direction, target.color, scene) if target else None
    if kind == "size":
        colors = rng.sample(color_names, 2)
        shapes = [rng.choice(SHAPES) for _ in range(2)]
        comparison = rng.choice(COMPARISONS)
        scene = _scene(rng, shapes, colors, rng.sample([1, 2, 3], 2))  # two different sizes
        if scene is None:
            return None
        return (comparison, size_target(scene, comparison).color, scene)
    raise ValueError(f"unknown question kind {kind!r}; allowed: {KINDS}")  # pragma: no cover


def position_target(scene: Scene, direction: str) -> SceneObject | None:
    """The object of a two-object scene that lies in `direction` of the other, or None unless their centres lie in
    different halves of the image along that axis and >= 24 px apart."""
    first, second = scene.objects
    axis = (lambda o: o.cx) if direction in ("left", "right") else (lambda o: o.cy)
    half = IMAGE_SIZE // 2
    if abs(axis(first) - axis(second)) < 24 or (axis(first) < half) == (axis(second) < half):
        return None
    smaller_first = axis(first) < axis(second)
    return first if smaller_first == (direction in ("left", "top")) else second


def size_target(scene: Scene, comparison: str) -> SceneObject | None:
    """The `comparison` ("larger" or "smaller") object of a two-object scene, or None unless the scene holds two
    objects of different sizes."""
    if len(scene.objects) != 2 or scene.objects[0].size == scene.objects[1].size:
        return None
    pick = max if comparison == "larger" else min
    return pick(scene.objects, key=lambda o: o.size)


def question_referent(scene: Scene, question: str) -> tuple[str, int] | None:
    """The object a question is about: (the word of the question that names it, its index in `scene.objects`), or
    None for counting questions. The word is the shape in colour questions, the colour in shape questions, the
    direction in position questions and the comparison in size questions; it must name exactly one object."""
    if question == QUESTIONS["count"]:
        return None
    words = split_words(question)
    word = words[4] if len(words) > 4 else None
    kind = next((k for k, ws in REFERENT_WORDS.items() if word in ws and question == QUESTIONS[k].format(word)), None)
    objects = scene.objects
    if kind == "color":
        matches = [i for i, o in enumerate(objects) if o.shape == word]
    elif kind == "shape":
        matches = [i for i, o in enumerate(objects) if o.color == word]
    elif kind == "position":
        target = position_target(scene, word) if len(objects) == 2 else None
        matches = [objects.index(target)] if target is not None else []
    elif kind == "size":
        target = size_target(scene, word)
        matches = [objects.index(target)] if target is not None else []
    else:
        raise ValueError(f"not a question of the generator: {question!r}")
    if len(matches) != 1:
        raise ValueError(f"question {question!r} does not name exactly one object of the scene {scene}")
    return word, matches[0]


@dataclass(frozen=True)
class SceneQuestion:
    """A question that a scene answers unambiguously (see `scene_questions`)."""

    kind: Kind
    question: str
    answer_word: str
    answer_set: tuple[str, ...]


def scene_questions(scene: Scene) -> list[SceneQuestion]:
    """Every question of the five kinds that `scene` answers unambiguously and that `make_item` could ask about it,
    in a fixed order. Used to add further question turns about the same image to a training conversation.

    Counting applies to every scene; colour and shape questions to scenes of at most `MAX_REFERENCE_OBJECTS` objects
    whose referent (shape, resp. colour) is unique; position and size questions to two-object scenes of two colours
    whose objects lie in different halves of the image along the axis (>= 24 px apart), resp. of different sizes.
    """
    objects = scene.objects
    colors = [o.color for o in objects]
    shapes = [o.shape for o in objects]
    out: list[SceneQuestion] = []
    if 1 <= len(objects) <= len(COUNTS):
        out.append(SceneQuestion("count", QUESTIONS["count"], COUNTS[len(objects) - 1], ANSWER_SETS["count"]))
    if len(objects) > MAX_REFERENCE_OBJECTS:
        return out
    for obj in objects:
        if shapes.count(obj.shape) == 1:
            out.append(SceneQuestion("color", QUESTIONS["color"].format(obj.shape), obj.color, ANSWER_SETS["color"]))
    for obj in objects:
        if colors.count(obj.color) == 1:
            out.append(SceneQuestion("shape", QUESTIONS["shape"].format(obj.color), obj.shape, ANSWER_SETS["shape"]))
    if len(objects) != 2 or colors[0] == colors[1]:
        return out
    for kind, find in (("position", position_target), ("size", size_target)):
        for word in REFERENT_WORDS[kind]:
            target = find(scene, word)
            if target is not None:
                out.append(SceneQuestion(kind, QUESTIONS[kind].format(word), target.color, ANSWER_SETS[kind]))
    return out


def follow_up_turns(item: SynthItem, count: int) -> list[tuple[str, str]]:
    """Up to `count` further (prompt, answer) turns about `item`'s image, for multi-turn training conversations.

    Drawn deterministically from the item's seed among `scene_questions(item.scene)` other than the item's own; as in
    LLaVA's multi-turn data, only the first turn carries the answer-format instruction (`SHORT_SUFFIX`).
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    rng = random.Random(item.seed * 7919 + 17)
    others = [q for q in scene_questions(item.scene) if q.question != item.question]
    return [(q.question, q.answer_word) for q in rng.sample(others, min(count, len(others)))]


def item_seed(split: str, index: int, seeds: dict[str, int] | None = None) -> int:
    """The seed of item `index` of `split`: `seeds[split] + index` (default seeds: `SPLIT_SEEDS`); a `ValueError` for
    an unknown split or an index outside `[0, SPLIT_CAPACITY)`."""
    seeds = SPLIT_SEEDS if seeds is None else seeds
    if split not in seeds:
        raise ValueError(f"unknown split {split!r}; allowed: {sorted(seeds)}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < SPLIT_CAPACITY:
        raise ValueError(f"item index {index!r} out of range; allowed: integers 0 <= index < {SPLIT_CAPACITY}")
    return seeds[split] + index


def item_fields(split: str, index: int, seed: int, kind: str, question: str) -> dict:
    """The fields every generated item (this module's and `vtw.synthvideo.generator`'s) shares: its id
    (``split-index``, six digits), split, seed, kind, question and prompt (the question, then `SHORT_SUFFIX`)."""
    prompt = f"{question}\n{SHORT_SUFFIX}"
    return dict(item_id=f"{split}-{index:06d}", split=split, seed=seed, kind=kind, question=question, prompt=prompt)


def iterate(make, split: str, count: int, start: int = 0) -> Iterator:
    """`make(split, index)` for the indices `start .. start+count-1`."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    for index in range(start, start + count):
        yield make(split, index)


def make_item(split: str, index: int) -> SynthItem:
    """Item `index` of `split` (deterministic: a function of `SPLIT_SEEDS[split] + index` only)."""
    seed = item_seed(split, index)
    rng = random.Random(seed)
    kind: Kind = rng.choice(KINDS)
    choice_rng = random.Random(rng.getrandbits(64))
    for _ in range(100):
        drawn = _question(rng, kind)
        if drawn is not None:
            break
    else:  # pragma: no cover - placing <= 5 small blocks on a 12 x 12 grid never fails 100 times in practice
        raise RuntimeError(f"could not place a scene for {split}[{index}]")
    word, answer, scene = drawn
    question = QUESTIONS[kind].format(word)
    others = choice_rng.sample([a for a in ANSWER_SETS[kind] if a != answer], NUM_CHOICES - 1)
    choices = tuple(choice_rng.sample([answer, *others], NUM_CHOICES))
    return SynthItem(**item_fields(split, index, seed, kind, question), answer=answer, choices=choices, scene=scene)


def iter_items(split: str, count: int, start: int = 0) -> Iterator[SynthItem]:
    """Items `start .. start+count-1` of `split` (see `make_item`)."""
    return iterate(make_item, split, count, start)


def chance_accuracy(items: list[SynthItem], multiple_choice: bool = False) -> float:
    """Expected accuracy of the best guess made without the image: mean of 1 / (number of possible answers), or
    1 / `NUM_CHOICES` for multiple choice. Answers are uniform over their answer set given the question's text, so no
    blind strategy beats this."""
    if not items:
        raise ValueError("chance_accuracy needs at least one item")
    if multiple_choice:
        return 1.0 / NUM_CHOICES
    return sum(1.0 / len(ANSWER_SETS[it.kind]) for it in items) / len(items)


def vocabulary() -> list[str]:
    """Every word and punctuation mark the generator can write, in a fixed order (for the word-level tokenizer)."""
    words: list[str] = []
    texts = [SHORT_SUFFIX, QUESTIONS["count"], *COUNTS]  # this order fixes the token ids of the shipped checkpoint
    texts += [
        QUESTIONS[kind].format(word) for kind in ("color", "shape", "position", "size") for word in REFERENT_WORDS[kind]
    ]
    for text in texts:
        for word in split_words(text):
            if word not in words:
                words.append(word)
    return words


def split_words(text: str) -> list[str]:
    """The word-level split used by the tokenizer: runs of letters/digits, and every other non-space character alone.

    For the generator's texts this is what the tokenizer's pre-tokenizer (`WhitespaceSplit`, then `Punctuation`
    isolated) produces.
    """
    out: list[str] = []
    current = ""
    for char in text:
        if char.isalnum() or char == "_":
            current += char
            continue
        if current:
            out.append(current)
            current = ""
        if not char.isspace():
            out.append(char)
    if current:
        out.append(current)
    return out
