"""ShapesVQA: every answer follows from the stored scene, generation is deterministic, splits are disjoint, answers
are balanced within each family."""

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from leanvlm.cli import app
from leanvlm.data.synthetic import ANSWERS, CELLS, FAMILIES, generate, synthesize


def solve(question: str, scene: dict) -> str:
    """Answer a question from the scene description alone (independent of how the generator built it)."""
    things = scene["things"]

    def find(colour=None, shape=None):
        return [t for t in things
                if (colour is None or t["colour"] == colour) and (shape is None or t["shape"] == shape)]

    def row_col(thing):
        return divmod(thing["cell"], 3)

    if m := re.search(r"(?:What color is|Which color does) the (\w+)", question):
        (match,) = find(shape=m[1])
        return match["colour"]
    if m := re.search(r"(?:the (\w+) object|Which shape is (\w+))", question):
        (match,) = find(colour=m[1] or m[2])
        return match["shape"]
    if m := re.search(r"(?:How many|Count the) (\w+)s", question):
        return str(len(find(shape=m[1])))
    if m := re.search(r"(?:Is there|contain) an? (\w+) (\w+)\?", question):
        return "yes" if find(m[1], m[2]) else "no"
    if m := re.search(r"Is the (\w+) (\w+) (?:located )?(left of|right of|above|below) the (\w+) (\w+)\?", question):
        (a,), (b,) = find(m[1], m[2]), find(m[4], m[5])
        (ra, ca), (rb, cb) = row_col(a), row_col(b)
        holds = {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[m[3]]
        return "yes" if holds else "no"
    if m := re.search(r"(?:Where is|part of the image is) the (\w+) (\w+)\?", question):
        (match,) = find(m[1], m[2])
        return CELLS[match["cell"]]
    if "word" in question:
        return scene["word"]
    raise AssertionError(f"unparsed question {question!r}")


@pytest.fixture(scope="module")
def samples():
    return generate(700, seed=11)


def test_every_answer_follows_from_the_scene(samples):
    for sample in samples:
        assert solve(sample["question"], sample["scene"]) == sample["answer"], sample
        assert 1 <= len(sample["scene"]["things"]) + (sample["scene"]["word"] is not None) <= 6
        cells = [t["cell"] for t in sample["scene"]["things"]] + [sample["scene"]["word_cell"]] * (
            sample["scene"]["word"] is not None)
        assert len(cells) == len(set(cells))  # one object per grid cell


def test_answers_are_balanced_within_each_family(samples):
    assert Counter(s["family"] for s in samples) == dict.fromkeys(FAMILIES, 100)
    for family in FAMILIES:
        counts = Counter(s["answer"] for s in samples if s["family"] == family)
        assert set(counts) == set(ANSWERS[family])
        assert max(counts.values()) - min(counts.values()) <= 1
        phrasings = {re.sub(r"\b(red|green|blue|yellow|purple|orange|circle|square|triangle)s?\b", "_", s["question"])
                     for s in samples if s["family"] == family}
        assert len(phrasings) >= 2, family


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(directory)).encode() + path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_and_disjoint_splits(tmp_path):
    synthesize(str(tmp_path / "a"), 70, 14, 14, seed=5, image_size=64)
    synthesize(str(tmp_path / "b"), 70, 14, 14, seed=5, image_size=64)
    synthesize(str(tmp_path / "c"), 70, 14, 14, seed=6, image_size=64)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")
    scenes = {split: {json.dumps(r["scene"], sort_keys=True)
                      for r in json.loads((tmp_path / "a" / f"{split}.json").read_text())}
              for split in ("train", "val", "test")}
    assert len(scenes["train"]) == 70
    assert not scenes["train"] & scenes["val"]
    assert not scenes["train"] & scenes["test"]
    assert not scenes["val"] & scenes["test"]


def test_cli_writes_llava_records_captions_and_card(tmp_path):
    result = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path), "--train", "14", "--val", "7",
                                      "--test", "7", "--image-size", "64"])
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "train.json").read_text())
    first = records[0]
    assert first["conversations"][0]["from"] == "system"
    assert first["conversations"][1]["from"] == "human" and first["conversations"][1]["value"].startswith("<image>\n")
    assert first["conversations"][2]["from"] == "gpt"
    assert (tmp_path / first["image"]).is_file()
    captions = json.loads((tmp_path / "captions.json").read_text())
    assert len(captions) == 14 and captions[0]["conversations"][1]["value"].startswith("The image shows")
    card = (tmp_path / "README.md").read_text()
    assert "| colour | 2 | 1 | 1 |" in card
    task = [json.loads(line) for line in (tmp_path / "lmms-task" / "docs.jsonl").read_text().splitlines()]
    assert [doc["id"] for doc in task] == [r["id"] for r in json.loads((tmp_path / "test.json").read_text())]
    assert (tmp_path / "lmms-task" / "shapesvqa_leanvlm.yaml").is_file()


def test_scenes_already_taken_are_drawn_again():
    first = generate(21, seed=1)
    taken = {s["key"] for s in first}
    again = generate(21, seed=1, taken=set(taken))  # the same seed would repeat every scene
    assert not taken & {s["key"] for s in again}
    assert [s["family"] for s in again] == [s["family"] for s in first]


def test_scene_questions_answer_every_family_from_the_scene(samples):
    import random

    from leanvlm.data.synthetic import scene_from_dict, scene_questions

    rng, asked = random.Random(3), Counter()
    for sample in samples:
        questions = scene_questions(scene_from_dict(sample["scene"]), rng)
        families = [family for family, _, _ in questions]
        assert len(families) == len(set(families))  # at most one question per family
        for family, question, answer in questions:
            assert answer in ANSWERS[family]
            assert solve(question, sample["scene"]) == answer, (question, sample["scene"])
        asked.update(families)
    assert set(asked) == set(FAMILIES)
    # the existence question is a fair coin, not always "no"
    answers = Counter(a for s in samples for f, _, a in scene_questions(scene_from_dict(s["scene"]), rng)
                      if f == "existence")
    assert min(answers.values()) > 0.35 * sum(answers.values())


def test_conversations_hold_each_records_question_and_answer(tmp_path):
    synthesize(str(tmp_path), 21, 0, 0, seed=2, image_size=32)
    records = json.loads((tmp_path / "train.json").read_text())
    turns = json.loads((tmp_path / "conversations.json").read_text())
    assert len(turns) == len(records)
    for record, conversation in zip(records, turns, strict=True):
        assert conversation["image"] == record["image"]
        messages = conversation["conversations"]
        assert messages[0]["from"] == "system"
        assert messages[1]["value"].startswith("<image>\n")
        assert sum("<image>" in m["value"] for m in messages) == 1
        pairs = [(q["value"].removeprefix("<image>\n"), a["value"]) for q, a in zip(messages[1::2], messages[2::2],
                                                                                   strict=True)]
        question = record["conversations"][1]["value"].removeprefix("<image>\n")
        assert (question, record["conversations"][2]["value"]) in pairs
        for asked, answer in pairs:
            assert solve(asked, record["scene"]) == answer
