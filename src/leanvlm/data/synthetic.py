"""ShapesVQA: a synthetic visual question-answering benchmark whose answers follow from the scene.

A scene places 1-6 objects (shape, colour, size) in distinct cells of a 3x3 grid, and sometimes a short word. Each
sample asks one question from a family (colour, shape, count, existence, spatial relation, position, text reading)
with a one-word or number answer. The answer is drawn first and the scene is built to fit it, so answers are balanced
within a family. Everything follows from the seed: the same seed gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 180), "orange": (240, 130, 20)}
CELLS = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right")
WORDS = ("cat", "sun", "box", "map", "red", "car", "dog", "pen", "cup", "hat", "key", "bus")
FAMILIES = ("colour", "shape", "count", "existence", "spatial", "position", "text")
NUMBERS = ("1", "2", "3", "4")
TEMPLATES = {
    "colour": ("What color is the {shape}?", "Which color does the {shape} have?"),
    "shape": ("What shape is the {colour} object?", "Which shape is {colour}?"),
    "count": ("How many {shape}s are there?", "Count the {shape}s in the image."),
    "existence": ("Is there {article} {colour} {shape}?", "Does the image contain {article} {colour} {shape}?"),
    "spatial": ("Is the {a} {relation} the {b}?", "Is the {a} located {relation} the {b}?"),
    "position": ("Where is the {colour} {shape}?", "In which part of the image is the {colour} {shape}?"),
    "text": ("What word is written in the image?", "Read the word in the image."),
}
RELATIONS = {"left of": (1, -1), "right of": (1, 1), "above": (0, -1), "below": (0, 1)}  # (axis: 0 row 1 col, sign)
ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "count": NUMBERS, "existence": ("yes", "no"),
           "spatial": ("yes", "no"), "position": CELLS, "text": WORDS}


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str  # "small" or "large"
    cell: int  # 0..8, row-major in the 3x3 grid

    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    word: str | None
    word_cell: int | None
    background: tuple[int, int, int]


# Tells a chat model the answer format (and replaces a chat template's longer default system prompt).
SYSTEM_PROMPT = "Answer with one word or number."

def scene_from_dict(fields: dict) -> Scene:
    """The inverse of `dataclasses.asdict(scene)` (how records store their scene)."""
    return Scene(tuple(Thing(**t) for t in fields["things"]), fields["word"], fields["word_cell"],
                 tuple(fields["background"]))


def rows_cols(cell: int) -> tuple[int, int]:
    return divmod(cell, 3)


def render(scene: Scene, size: int = 224) -> Image.Image:
    image = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(image)
    step = size / 3
    for thing in scene.things:
        row, col = rows_cols(thing.cell)
        cx, cy = (col + 0.5) * step, (row + 0.5) * step
        half = step * (0.36 if thing.size == "large" else 0.2)
        box = [cx - half, cy - half, cx + half, cy + half]
        colour = COLOURS[thing.colour]
        if thing.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif thing.shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    if scene.word is not None:
        row, col = rows_cols(scene.word_cell)
        font = ImageFont.load_default(size=max(10, int(step * 0.4)))
        draw.text(((col + 0.5) * step, (row + 0.5) * step), scene.word.upper(), fill=(0, 0, 0), font=font,
                  anchor="mm")
    return image


def caption(scene: Scene) -> str:
    parts = [f"a {t.size} {t.name()} at the {CELLS[t.cell]}" for t in scene.things]
    if scene.word is not None:
        parts.append(f'the word "{scene.word}" at the {CELLS[scene.word_cell]}')
    return "The image shows " + ", ".join(parts) + "."


class SceneBuilder:
    """Random scenes that satisfy a family's target answer."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def thing(self, cell: int, shape=None, colour=None, avoid=()) -> Thing:
        while True:
            candidate = Thing(shape or self.rng.choice(SHAPES), colour or self.rng.choice(tuple(COLOURS)),
                              self.rng.choice(("small", "large")), cell)
            if (candidate.shape, candidate.colour) not in avoid:
                return candidate

    def fill(self, things: list[Thing], total: int, keep) -> list[Thing]:
        """Add random things in free cells while `keep(things)` holds (the answer must not change)."""
        free = [c for c in range(9) if c not in {t.cell for t in things}]
        self.rng.shuffle(free)
        for cell in free[: max(0, total - len(things))]:
            for _ in range(20):
                candidate = self.thing(cell)
                if keep([*things, candidate]):
                    things = [*things, candidate]
                    break
        self.rng.shuffle(things)
        return things


def make_sample(family: str, answer: str, rng: random.Random) -> tuple[Scene, str]:
    """A scene and a question whose answer is `answer`."""
    build = SceneBuilder(rng)
    total = rng.randint(1, 6)
    cells = list(range(9))
    rng.shuffle(cells)
    word, word_cell, fields = None, None, {}
    if family == "colour":  # the only thing of its shape has the answer colour
        target = build.thing(cells.pop(), colour=answer)
        things = build.fill([target], total, lambda ts: sum(t.shape == target.shape for t in ts) == 1)
        fields = {"shape": target.shape}
    elif family == "shape":
        target = build.thing(cells.pop(), shape=answer)
        things = build.fill([target], total, lambda ts: sum(t.colour == target.colour for t in ts) == 1)
        fields = {"colour": target.colour}
    elif family == "count":
        shape = rng.choice(SHAPES)
        count = int(answer)
        things = [build.thing(cells.pop(), shape=shape) for _ in range(count)]
        things = build.fill(things, max(total, count), lambda ts: sum(t.shape == shape for t in ts) == count)
        fields = {"shape": shape}
    elif family == "existence":
        shape, colour = rng.choice(SHAPES), rng.choice(tuple(COLOURS))
        things = [build.thing(cells.pop(), shape, colour)] if answer == "yes" else []
        wanted = answer == "yes"
        things = build.fill(things, total, lambda ts: any((t.shape, t.colour) == (shape, colour) for t in ts) == wanted)
        fields = {"shape": shape, "colour": colour, "article": "an" if colour[0] in "aeiou" else "a"}
    elif family == "spatial":
        relation = rng.choice(tuple(RELATIONS))
        axis, sign = RELATIONS[relation]
        while True:  # two things whose cells differ along the relation's axis
            a_cell, b_cell = rng.sample(range(9), 2)
            if rows_cols(a_cell)[axis] != rows_cols(b_cell)[axis]:
                break
        holds = (rows_cols(a_cell)[axis] - rows_cols(b_cell)[axis]) * sign > 0
        if holds != (answer == "yes"):
            a_cell, b_cell = b_cell, a_cell
        a = build.thing(a_cell)
        b = build.thing(b_cell, avoid={(a.shape, a.colour)})
        unique = lambda ts: all(sum((t.shape, t.colour) == (x.shape, x.colour) for t in ts) == 1 for x in (a, b))  # noqa: E731
        things = build.fill([a, b], max(total, 2), unique)
        fields = {"a": a.name(), "b": b.name(), "relation": relation}
    elif family == "position":
        target = build.thing(CELLS.index(answer))
        things = build.fill([target], total,
                            lambda ts: sum((t.shape, t.colour) == (target.shape, target.colour) for t in ts) == 1)
        fields = {"shape": target.shape, "colour": target.colour}
    else:  # text
        word = answer
        word_cell = cells.pop()
        things = build.fill([], max(0, total - 1), lambda ts: all(t.cell != word_cell for t in ts))
    background = tuple(rng.randint(225, 250) for _ in range(3))
    question = rng.choice(TEMPLATES[family]).format(**fields)
    return Scene(tuple(things), word, word_cell, background), question


def scene_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """(family, question, answer) for every family this scene can answer, read off the scene alone: one question per
    family, with the same templates and uniqueness rules as `make_sample` (a colour question names a shape that
    occurs once, a count question a shape that occurs 1-4 times, ...)."""
    things = scene.things
    kinds = Counter((t.shape, t.colour) for t in things)
    by_shape, by_colour = Counter(t.shape for t in things), Counter(t.colour for t in things)
    asked = []

    def ask(family: str, answer: str, **fields) -> None:
        asked.append((family, rng.choice(TEMPLATES[family]).format(**fields), answer))

    single_shape = [t for t in things if by_shape[t.shape] == 1]
    if single_shape:
        target = rng.choice(single_shape)
        ask("colour", target.colour, shape=target.shape)
    single_colour = [t for t in things if by_colour[t.colour] == 1]
    if single_colour:
        target = rng.choice(single_colour)
        ask("shape", target.shape, colour=target.colour)
    countable = [shape for shape in SHAPES if str(by_shape[shape]) in NUMBERS]
    if countable:
        shape = rng.choice(countable)
        ask("count", str(by_shape[shape]), shape=shape)
    present = list(kinds)
    absent = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in kinds]
    shape, colour = rng.choice(present) if present and rng.random() < 0.5 else rng.choice(absent)
    ask("existence", "yes" if (shape, colour) in kinds else "no", shape=shape, colour=colour,
        article="an" if colour[0] in "aeiou" else "a")
    unique = [t for t in things if kinds[(t.shape, t.colour)] == 1]
    pairs = [(a, b, relation) for a in unique for b in unique for relation, (axis, _) in RELATIONS.items()
             if a is not b and rows_cols(a.cell)[axis] != rows_cols(b.cell)[axis]]
    if pairs:
        a, b, relation = rng.choice(pairs)
        axis, sign = RELATIONS[relation]
        holds = (rows_cols(a.cell)[axis] - rows_cols(b.cell)[axis]) * sign > 0
        ask("spatial", "yes" if holds else "no", a=a.name(), b=b.name(), relation=relation)
    if unique:
        target = rng.choice(unique)
        ask("position", CELLS[target.cell], shape=target.shape, colour=target.colour)
    if scene.word is not None:
        ask("text", scene.word)
    return asked


def conversation(turns: list[tuple[str, str]]) -> list[dict]:
    """A LLaVA-format conversation about one image: the system prompt, then (question, answer) turns, the image
    placeholder before the first question."""
    messages = [{"from": "system", "value": SYSTEM_PROMPT}]
    for index, (question, answer) in enumerate(turns):
        messages += [{"from": "human", "value": ("<image>\n" if index == 0 else "") + question},
                     {"from": "gpt", "value": answer}]
    return messages


def scene_key(scene: Scene) -> str:
    return hashlib.sha1(json.dumps(asdict(scene), sort_keys=True).encode()).hexdigest()


def generate(count: int, seed: int, taken: set[str] | None = None) -> list[dict]:
    """`count` samples (scene, question, answer, family, caption), families round-robin, answers balanced by
    cycling through each family's answers in a seeded order; scenes already in `taken` are drawn again."""
    rng = random.Random(seed)
    taken = set() if taken is None else taken
    cycles = {family: [] for family in FAMILIES}
    samples = []
    while len(samples) < count:
        family = FAMILIES[len(samples) % len(FAMILIES)]
        if not cycles[family]:
            cycles[family] = rng.sample(ANSWERS[family], len(ANSWERS[family]))
        answer = cycles[family][-1]
        scene, question = make_sample(family, answer, rng)
        key = scene_key(scene)
        if key in taken:
            continue
        cycles[family].pop()
        taken.add(key)
        samples.append({"family": family, "question": question, "answer": answer, "scene": asdict(scene),
                        "caption": caption(scene), "key": key})
    return samples


def write_split(samples: list[dict], out_dir: str, split: str, image_size: int = 224) -> list[dict]:
    """PNG images and LLaVA-format records of one split."""
    os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
    records = []
    for index, sample in enumerate(samples):
        sample_id = f"{split}-{index:06d}"
        relative = os.path.join("images", split, f"{sample_id}.png")
        render(scene_from_dict(sample["scene"]), image_size).save(os.path.join(out_dir, relative))
        records.append({
            "id": sample_id,
            "image": relative,
            "family": sample["family"],
            "conversations": conversation([(sample["question"], sample["answer"])]),
            "caption": sample["caption"],
            "scene": sample["scene"],
        })
    return records


def synthesize(out_dir: str, train: int, val: int, test: int, seed: int = 0, image_size: int = 224,
               progress=None) -> dict:
    """Write a ShapesVQA dataset: images/, {split}.json (LLaVA format), captions.json (alignment data on the train
    images), README.md (card with family counts). Splits never share a scene."""
    os.makedirs(out_dir, exist_ok=True)
    taken: set[str] = set()
    counts = {}
    for offset, (split, count) in enumerate((("train", train), ("val", val), ("test", test))):
        if progress is not None:
            progress(split)
        records = write_split(generate(count, seed * 1000 + offset, taken), out_dir, split, image_size)
        with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
            json.dump(records, f, indent=1)
        counts[split] = Counter(r["family"] for r in records)
        if split == "train":
            captions = [{"id": r["id"] + "-caption", "image": r["image"], "conversations": [
                {"from": "human", "value": "<image>"}, {"from": "gpt", "value": r["caption"]}]} for r in records]
            with open(os.path.join(out_dir, "captions.json"), "w") as f:
                json.dump(captions, f, indent=1)
            with open(os.path.join(out_dir, "conversations.json"), "w") as f:
                json.dump(conversations(records, seed * 1000 + 7), f, indent=1)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(card(counts, seed, image_size))
    return {split: dict(c) for split, c in counts.items()}


def conversations(records: list[dict], seed: int) -> list[dict]:
    """One multi-turn record per image: its own (answer-balanced) question, then a question of every other family
    the scene can answer, in a seeded random order. Training on these supervises every family on each image."""
    rng = random.Random(seed)
    result = []
    for record in records:
        scene = scene_from_dict(record["scene"])
        first = next(t for t in record["conversations"] if t["from"] == "human")["value"].removeprefix("<image>\n")
        answer = record["conversations"][-1]["value"]
        others = [(q, a) for family, q, a in scene_questions(scene, rng) if family != record["family"]]
        turns = [(first, answer), *others]
        rng.shuffle(turns)
        result.append({"id": record["id"] + "-turns", "image": record["image"], "family": "all",
                       "conversations": conversation(turns)})
    return result


def render_counts(counts: dict, console, out_dir: str) -> None:
    """Samples per split and family, and where they went."""
    for split, families in counts.items():
        listed = ", ".join(f"{k} {v}" for k, v in families.items())
        console.print(f"{split}: {sum(families.values())} samples {listed}")
    console.print(f"wrote {out_dir}")


def card(counts: dict, seed: int, image_size: int) -> str:
    lines = ["# ShapesVQA", "",
             f"Synthetic visual question answering, generated by `leanvlm data synth` with seed {seed}: "
             f"{image_size}-pixel images of 1-6 shapes ({', '.join(SHAPES)}) in {len(COLOURS)} colours on a 3x3 "
             "grid, sometimes with a short word. Every answer follows from the scene stored with its record.", "",
             "| family | " + " | ".join(counts) + " | answers |", "|---" * (len(counts) + 2) + "|"]
    for family in FAMILIES:
        lines.append(f"| {family} | " + " | ".join(str(counts[s].get(family, 0)) for s in counts)
                     + f" | {', '.join(ANSWERS[family])} |")
    lines += ["", "Files: `{train,val,test}.json` (LLaVA format, with `family` and `scene`), `captions.json` (one "
              "caption per train image), `conversations.json` (one conversation per train image: its question and "
              "one of every other family the scene answers, shuffled), `images/`."]
    return "\n".join(lines) + "\n"
