"""Seeded generator of short synthetic clips whose questions need time, not one frame.

Every item is a clip of `FRAMES` frames of `CANVAS` x `CANVAS` pixels (`FPS` frames per second, so one second) of
flat shapes drawn with the same primitives, colours and shape names as `vtw.synthvqa` (:func:`draw_object`), and one
question of three kinds:

| kind        | question                                  | clip                                               | answers        |
|-------------|-------------------------------------------|----------------------------------------------------|----------------|
| `direction` | Which way does the {shape} move?          | one shape moves `STEP` px per frame; one stands     | `DIRECTIONS`   |
| `order`     | Which shape appears first?                | two shapes appear at different frames, then stay   | `SHAPES`       |
| `flash`     | How many times does the {color} square flash? | a square is shown on 1-4 separate frames; a circle stays | `FLASHES` |

Every answer set has four answers, and the answer is drawn uniformly first, so a model that does not watch the clip
is at chance: 1/4 for the short answer and for multiple choice (the four answers of the kind, shuffled). A single
frame does not suffice either: the direction needs two positions, the order two moments, the count every frame
(with fewer than `FRAMES` frames sampled, flashes can be missed; the tasks expect ``max_frames_num`` = 8).

Determinism: item `i` of a split comes from its own `random.Random(SPLIT_SEEDS[split] + i)` (disjoint seed ranges
per split); the same seed gives the same frames and, for a given PyAV (FFmpeg) build, the same MP4 bytes.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vtw.synthvqa.generator import (
    COLORS,
    SHAPES,
    SHORT_SUFFIX,
    SceneObject,
    draw_object,
    item_fields,
    item_seed,
    iterate,
)

CANVAS = 64
"""Side of a frame in pixels."""
FRAMES = 8
FPS = 8
SIZE = 12
"""Side of every shape's box in pixels."""
STEP = 4
"""Pixels a moving shape travels per frame (28 px over the clip)."""
BACKGROUND = (245, 245, 245)
KINDS: tuple[str, ...] = ("direction", "order", "flash")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
FLASHES: tuple[str, ...] = ("1", "2", "3", "4")
ANSWER_SETS: dict[str, tuple[str, ...]] = {"direction": DIRECTIONS, "order": SHAPES, "flash": FLASHES}
QUESTIONS: dict[str, str] = {
    "direction": "Which way does the {} move?",
    "order": "Which shape appears first?",
    "flash": "How many times does the {} square flash?",
}
SPLIT_SEEDS: dict[str, int] = {"train": 2_000_000_000, "test": 3_000_000_000}
"""First seed of each split (ranges of `vtw.synthvqa.generator.SPLIT_CAPACITY` seeds, disjoint from synthvqa's)."""
_MOVES = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass(frozen=True)
class ClipItem:
    """One video question: `frames[t]` holds the objects visible in frame `t` (drawn in order).

    `prompt` is the user text shown with the video (the question and `SHORT_SUFFIX`); `answer` one word; `choices`
    the kind's four answers in random order (the multiple-choice form).
    """

    item_id: str
    split: str
    seed: int
    kind: str
    question: str
    prompt: str
    answer: str
    choices: tuple[str, ...]
    frames: tuple[tuple[SceneObject, ...], ...]

    def render(self) -> np.ndarray:
        """The clip as ``(FRAMES, CANVAS, CANVAS, 3)`` uint8 RGB."""
        out = []
        for objects in self.frames:
            image = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
            draw = ImageDraw.Draw(image)
            for obj in objects:
                draw_object(draw, obj, COLORS[obj.color])
            out.append(np.asarray(image))
        return np.stack(out)

    def mp4_bytes(self) -> bytes:
        """The clip encoded with PyAV: MPEG-4 Part 2 (quantiser 1-2, every frame a key frame, one thread) in MP4, yuv420p, `FPS` frames per second."""
        import av

        buffer = io.BytesIO()
        with av.open(buffer, "w", format="mp4") as container:
            # FFmpeg's own MPEG-4 Part 2 encoder: libx264 gave different bytes for ~2% of the clips between runs
            stream = container.add_stream("mpeg4", rate=FPS, options={"qmin": "1", "qmax": "2"})
            stream.width = stream.height = CANVAS
            stream.pix_fmt = "yuv420p"
            stream.thread_count = 1
            stream.codec_context.gop_size = 1  # every frame a key frame: no drift of colours over the clip
            for frame in self.render():
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return buffer.getvalue()


def _spot(rng: random.Random, taken: list[tuple[int, int]], lo: int = SIZE // 2, hi: int = CANVAS - SIZE // 2 - 1):
    """A box centre in ``[lo, hi]^2`` whose box keeps 2 px from the boxes centred at ``taken``."""
    for _ in range(500):
        cx, cy = rng.randint(lo, hi), rng.randint(lo, hi)
        if all(abs(cx - x) > SIZE + 1 or abs(cy - y) > SIZE + 1 for x, y in taken):
            return cx, cy
    raise RuntimeError("could not place a shape")  # pragma: no cover - two 12 px boxes on 64 px always fit


def _direction(rng: random.Random, answer: str):
    shape, other = rng.sample(SHAPES, 2)
    color, other_color = rng.sample(list(COLORS), 2)
    dx, dy = _MOVES[answer]
    travel = STEP * (FRAMES - 1)
    half = SIZE // 2
    # start so that the whole path stays on the canvas
    x0 = rng.randint(half + max(0, -dx * travel), CANVAS - half - 1 - max(0, dx * travel))
    y0 = rng.randint(half + max(0, -dy * travel), CANVAS - half - 1 - max(0, dy * travel))
    path = [(x0 + dx * STEP * t, y0 + dy * STEP * t) for t in range(FRAMES)]
    for _ in range(500):  # a standing shape off the moving one's path
        sx, sy = _spot(rng, [])
        if all(abs(sx - x) > SIZE + 1 or abs(sy - y) > SIZE + 1 for x, y in path):
            break
    else:  # pragma: no cover
        raise RuntimeError("could not place the standing shape")
    still = SceneObject(other, other_color, sx, sy, SIZE)
    frames = tuple((still, SceneObject(shape, color, x, y, SIZE)) for x, y in path)
    return shape, frames


def _order(rng: random.Random, answer: str):
    second = rng.choice([s for s in SHAPES if s != answer])
    c1, c2 = rng.sample(list(COLORS), 2)
    first_at = rng.randint(0, 2)
    second_at = rng.randint(first_at + 2, FRAMES - 3)
    p1 = _spot(rng, [])
    p2 = _spot(rng, [p1])
    a, b = SceneObject(answer, c1, *p1, SIZE), SceneObject(second, c2, *p2, SIZE)
    frames = tuple(tuple(o for o, at in ((a, first_at), (b, second_at)) if t >= at) for t in range(FRAMES))
    return None, frames


def _flash(rng: random.Random, answer: str):
    count = int(answer)
    color, other_color = rng.sample(list(COLORS), 2)
    while True:  # `count` frames, no two adjacent: each flash is one frame on between frames off
        on = sorted(rng.sample(range(FRAMES), count))
        if all(b - a >= 2 for a, b in zip(on, on[1:])):
            break
    p1 = _spot(rng, [])
    p2 = _spot(rng, [p1])
    square, circle = SceneObject("square", color, *p1, SIZE), SceneObject("circle", other_color, *p2, SIZE)
    frames = tuple((circle, square) if t in on else (circle,) for t in range(FRAMES))
    return color, frames


_BUILDERS = {"direction": _direction, "order": _order, "flash": _flash}


def make_item(split: str, index: int) -> ClipItem:
    """Item `index` of `split` (a function of `SPLIT_SEEDS[split] + index` only)."""
    seed = item_seed(split, index, SPLIT_SEEDS)
    rng = random.Random(seed)
    kind = KINDS[index % len(KINDS)]  # the kinds in turn: equal shares in any prefix of a split
    answer = rng.choice(ANSWER_SETS[kind])
    word, frames = _BUILDERS[kind](rng, answer)
    question = QUESTIONS[kind].format(word) if word is not None else QUESTIONS[kind]
    choices = tuple(rng.sample(ANSWER_SETS[kind], len(ANSWER_SETS[kind])))
    return ClipItem(**item_fields(split, index, seed, kind, question), answer=answer, choices=choices, frames=frames)


def iter_items(split: str, count: int, start: int = 0) -> Iterator[ClipItem]:
    """Items `start .. start+count-1` of `split` (see `make_item`)."""
    return iterate(make_item, split, count, start)


def chance_accuracy() -> float:
    """Accuracy of the best answer given without the clip, short answer and multiple choice alike: every kind has four
    answers, drawn uniformly whatever the question's words."""
    return sum(1.0 / len(ANSWER_SETS[kind]) for kind in KINDS) / len(KINDS)  # kinds in equal shares


def vocabulary() -> list[str]:
    """Every word and punctuation mark the generator can write, in a fixed order (for a word-level tokenizer)."""
    from vtw.synthvqa.generator import split_words

    texts = [SHORT_SUFFIX, QUESTIONS["order"], *DIRECTIONS, *SHAPES, *FLASHES]
    texts += [QUESTIONS["direction"].format(s) for s in SHAPES] + [QUESTIONS["flash"].format(c) for c in COLORS]
    words: list[str] = []
    for text in texts:
        words += [w for w in split_words(text) if w not in words]
    return words
