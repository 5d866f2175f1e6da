"""Offline lmms-eval tasks from LLaVA-format records (ShapesVQA's test split by default).

`write_task` writes a folder for lmms-eval's `--include_path`: the records as `docs.jsonl` (absolute image paths),
two task YAMLs that read it with `dataset_path: json`, and a `utils.py` that points at the functions below.

- `NAME` (generation): each record's last question asked as a chat, scored by `leanvlm eval`'s exact match
  (the same normalisation), overall and per family.
- `NAME_mc` (multiple choice, lmms-eval's simple route): the model's log-likelihood ranks the answers its family
  uses in the file; accuracy is lmms-eval's `acc`.

The functions here import nothing from lmms-eval, so the folder's tasks also run with lmms-eval's other models
(`--model openai_compatible` against `leanvlm serve`, for one).
"""

from __future__ import annotations

import ast
import json
import os
import re

from leanvlm.config import IMAGE_TOKEN
from leanvlm.data.llava import read_records
from leanvlm.data.templates import with_image_placeholders
from leanvlm.eval.exact_match import conversations, normalize

TASK = "shapesvqa_leanvlm"
DOCS_FILE = "docs.jsonl"
UTILS = '''"""lmms-eval task functions for this folder's tasks (written by `leanvlm data lmms-task`)."""

from leanvlm.eval.lmms_task import (  # noqa: F401
    doc_to_choice,
    doc_to_messages,
    doc_to_target_index,
    doc_to_text,
    doc_to_visual,
    process_choice_results,
    process_results,
)
'''


def metric_name(family: str) -> str:
    """The per-family metric's name: `exact_match_<family>` with anything but letters, digits and _ as _."""
    return "exact_match_" + re.sub(r"\W", "_", family)


def docs(records: list, image_root: str, source: str = "data") -> list[dict]:
    """Records -> lmms-eval documents: the conversation before the last answer (JSON text, so every document has
    one schema), absolute image paths, the reference, the family and its answer choices. A message whose images
    are not all at its start, on a line of their own before its text, is an error: chat tasks carry images apart
    from the text and leanvlm puts them back there, so lmms-eval would ask something other than `leanvlm eval`."""
    asked = conversations(records, image_root, source)
    choices: dict[str, set] = {}
    for c in asked:
        choices.setdefault(c.family or "", set()).add(c.reference)
    written = []
    for c in asked:
        for message in c.messages:
            text, images = split_placeholders(message["content"])
            if images and text is None:
                raise ValueError(f"{source}, record id {c.id!r}: a message holds only {IMAGE_TOKEN} "
                                 f"({message['content']!r}); chat harnesses send a text with every message, so add "
                                 "the question after a new line.")
            if with_image_placeholders([text], images) != message["content"]:
                raise ValueError(f"{source}, record id {c.id!r}: its {IMAGE_TOKEN} placeholders are not all at the "
                                 f"start of the message followed by a new line ({message['content']!r}); chat "
                                 "harnesses place images before the text, so write the record that way.")
        written.append({"id": str(c.id), "family": c.family or "", "messages": json.dumps(c.messages),
                        "images": [os.path.abspath(p) for p in c.images], "answer": c.reference,
                        "choices": sorted(choices[c.family or ""])})
    return written


def split_placeholders(content: str) -> tuple[str | None, int]:
    """A message's text after its leading `<image>` placeholders and the new line that follows them, and how many
    placeholders the message holds; None as the text when the message is placeholders alone."""
    count = content.count(IMAGE_TOKEN)
    if not count:
        return content, 0
    rest = content[len(IMAGE_TOKEN * count):] if content.startswith(IMAGE_TOKEN * count) else content
    if rest == "":
        return None, count
    return (rest[1:] if rest.startswith("\n") else rest), count


def write_task(data: str, out: str, image_root: str | None = None, name: str = TASK) -> list[str]:
    """Write the task folder for the LLaVA-format file `data` (relative image paths start from `image_root`,
    default the file's directory); returns the paths written."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"Task name {name!r}: use letters, digits, '_', '-' and '.' only (it names files and the "
                         "task in lmms-eval).")
    root = image_root or os.path.dirname(os.path.realpath(data))
    documents = docs(read_records(data), root, data)
    if not documents:
        raise ValueError(f"{data}: no records to write a task from.")
    os.makedirs(out, exist_ok=True)
    paths = {"docs": os.path.join(out, DOCS_FILE), "utils": os.path.join(out, "utils.py"),
             "generation": os.path.join(out, f"{name}.yaml"), "mc": os.path.join(out, f"{name}_mc.yaml")}
    with open(paths["docs"], "w") as f:
        f.writelines(json.dumps(doc) + "\n" for doc in documents)
    with open(paths["utils"], "w") as f:
        f.write(UTILS)
    families = sorted({doc["family"] for doc in documents} - {""})
    names = [metric_name(f) for f in families]
    if len(set(names)) < len(names):
        raise ValueError(f"Families {families} give clashing metric names {names}; rename the families.")
    source = _dataset_lines(os.path.abspath(paths["docs"]))
    with open(paths["generation"], "w") as f:
        f.write(_generation_yaml(name, source, families))
    with open(paths["mc"], "w") as f:
        f.write(_mc_yaml(name + "_mc", source))
    return list(paths.values())


def _dataset_lines(docs_path: str) -> str:
    # json.dumps quotes the path as YAML reads it, whatever characters it holds
    return ("dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + json.dumps(docs_path)
            + "\ntest_split: test\n")


def _metric(name: str, aggregation: str = "mean") -> str:
    return f"  - metric: {name}\n    aggregation: {aggregation}\n    higher_is_better: true\n"


def _generation_yaml(name: str, source: str, families: list[str]) -> str:
    metrics = "".join(_metric(m) for m in ["exact_match", *(metric_name(f) for f in families)])
    return (f"task: {name}\n{source}output_type: generate_until\n"
            "doc_to_messages: !function utils.doc_to_messages\n"
            "doc_to_visual: !function utils.doc_to_visual\n"
            "doc_to_text: !function utils.doc_to_text\n"
            "doc_to_target: answer\n"
            # until: [] so nothing cuts the answer that `leanvlm eval` would score whole
            "generation_kwargs:\n  max_new_tokens: 16\n  temperature: 0\n  do_sample: false\n  until: []\n"
            "process_results: !function utils.process_results\n"
            f"metric_list:\n{metrics}metadata:\n  version: 1.0\n")


def _mc_yaml(name: str, source: str) -> str:
    return (f"task: {name}\n{source}output_type: multiple_choice\n"
            "doc_to_visual: !function utils.doc_to_visual\n"
            "doc_to_text: !function utils.doc_to_text\n"
            "doc_to_choice: !function utils.doc_to_choice\n"
            "doc_to_target: !function utils.doc_to_target_index\n"
            # the answer follows the chat template's assistant header directly, as in training
            'target_delimiter: ""\n'
            "process_results: !function utils.process_choice_results\n"
            f"metric_list:\n{_metric('acc')}metadata:\n  version: 1.0\n")


# --- the functions the task YAMLs name ---------------------------------------------------------------------------

def doc_to_messages(doc: dict) -> list[dict]:
    """The conversation as lmms-eval chat messages: each message's images (as paths) first, then its text."""
    images = iter(doc["images"])
    messages = []
    for message in json.loads(doc["messages"]):
        text, count = split_placeholders(message["content"])
        parts = [{"type": "image", "url": next(images)} for _ in range(count)]
        parts.append({"type": "text", "text": text})
        messages.append({"role": message["role"], "content": parts})
    return messages


def doc_to_visual(doc: dict) -> list:
    """The document's images, RGB, in placeholder order."""
    from PIL import Image

    visuals = []
    for path in doc["images"]:
        with Image.open(path) as image:
            visuals.append(image.convert("RGB"))
    return visuals


def doc_to_text(doc: dict) -> str:
    """The last question's text (the simple route asks it alone, without earlier turns)."""
    users = [m for m in json.loads(doc["messages"]) if m["role"] == "user"]
    return (split_placeholders(users[-1]["content"])[0] or "") if users else ""


def doc_to_choice(doc: dict) -> list[str]:
    return list(doc["choices"])


def doc_to_target_index(doc: dict) -> int:
    return list(doc["choices"]).index(doc["answer"])


def log_likelihood(result) -> float:
    """One choice's log-likelihood from lmms-eval's result: a (log-likelihood, is-greedy) pair, or that pair as
    text, which lmms-eval 0.7.3 makes of every log-likelihood result before tasks see it."""
    pair = ast.literal_eval(result) if isinstance(result, str) else result
    return float(pair[0])


def process_choice_results(doc: dict, results: list) -> dict:
    """Accuracy of the choice with the highest log-likelihood (ties go to the first, as lmms-eval's `acc`)."""
    scores = [log_likelihood(r) for r in results]
    return {"acc": float(scores.index(max(scores)) == doc_to_target_index(doc))}


def process_results(doc: dict, results: list) -> dict:
    """Exact match after `leanvlm.eval.exact_match.normalize`, counted overall and in the document's family."""
    prediction = results[0] if isinstance(results[0], str) else str(results[0])
    correct = float(normalize(prediction) == normalize(doc["answer"]))
    scores = {"exact_match": correct}
    if doc["family"]:
        scores[metric_name(doc["family"])] = correct
    return scores
