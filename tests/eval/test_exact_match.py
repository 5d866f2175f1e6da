"""`leanvlm eval` and `leanvlm chat`: prompts equal to training prefixes, batched answers equal to one-by-one
generation, exact-match scoring, bad input, and the two commands end to end."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny import bpe_tokenizer, build
from typer.testing import CliRunner

from leanvlm import LeanVLMForConditionalGeneration, LeanVLMProcessor
from leanvlm.cli import app
from leanvlm.data.llava import LLaVADataset
from leanvlm.decoders.base import IGNORE_INDEX
from leanvlm.eval.exact_match import check_metric_fields, encode_prompts, evaluate, normalize, questions, score
from leanvlm.stats import wilson_interval


def tokenizer():
    """A BPE tokenizer that merges across the joint of vicuna_v1's system line and "USER:", so a prompt tokenized
    whole differs from one tokenized piece by piece, as with real tokenizers."""
    return bpe_tokenizer(["Answer in one word. USER: What color is the square? ASSISTANT: red",
                          "How many circles?\ntwo three blue green"] * 3)


RECORDS = [
    {"id": "sys", "image": "a.png", "family": "colour", "conversations": [
        {"from": "system", "value": "Answer in one word."},
        {"from": "human", "value": "<image>\nWhat color is the square?"}, {"from": "gpt", "value": "red"}]},
    {"id": "turns", "image": "b.png", "family": "count", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the square?"}, {"from": "gpt", "value": "blue"},
        {"from": "human", "value": "How many circles?"}, {"from": "gpt", "value": "two"}]},
    {"id": "pair", "image": ["a.png", "b.png"], "family": "colour", "conversations": [
        {"from": "human", "value": "<image> then <image>: which is green?"}, {"from": "gpt", "value": "neither"}]},
    {"id": "text", "conversations": [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "three"}]},
    {"id": "implicit", "image": "a.png", "family": "count", "conversations": [
        {"from": "human", "value": "How many squares?"}, {"from": "gpt", "value": "one"}]},
]


@pytest.fixture
def data(tmp_path):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    Image.new("RGB", (24, 36), "blue").save(tmp_path / "b.png")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS))
    return path


def training_prompt(dataset, index) -> list[int]:
    """The ids of a training sample before its last scored run: what the model saw before the last answer."""
    ids, labels = dataset.tokenize(index)
    start = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    while labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return ids[:start]


def unpadded(input_ids, attention_mask) -> list[list[int]]:
    return [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask, strict=True)]


@pytest.mark.parametrize("template", ["chat", "vicuna_v1", "plain"])
def test_prompts_equal_the_training_prefix(data, template):
    processor = LeanVLMProcessor.for_model(build("vanilla"), tokenizer())
    dataset = LLaVADataset(str(data), processor, template=template)
    asked = questions(json.loads(data.read_text()), template, processor.tokenizer, str(data.parent))
    prompts = unpadded(*encode_prompts(processor, [q.prompt for q in asked]))
    expected = [training_prompt(dataset, i) for i in range(len(dataset))]
    assert prompts == expected
    assert [q.reference for q in asked] == ["red", "two", "neither", "three", "one"]
    assert asked[1].question == "How many circles?" and asked[1].family == "count" and asked[3].family is None
    assert [len(q.images) for q in asked] == [1, 1, 2, 0, 1]
    if template == "vicuna_v1":  # the joined prompt would tokenize differently: the pieces must stay apart
        whole = [processor.tokenizer("".join(q.prompt), add_special_tokens=False)["input_ids"] for q in asked]
        whole = [[processor.image_token_id if t == processor.tokenizer_image_id else t for t in row] for row in whole]
        assert whole != expected


def one_by_one(model, processor, dataset, max_new_tokens) -> list[str]:
    """Each sample's answer generated alone from its training prefix (no padding, no batching)."""
    eos = model.config.text_config.eos_token_id
    answers = []
    for index in range(len(dataset)):
        ids, images = training_prompt(dataset, index), dataset[index]["images"]
        extra = {}
        if images:
            extra["pixel_values"], extra["image_crops"] = processor.preprocess_images(images)
        with torch.no_grad():
            new = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, **extra)[0, len(ids):].tolist()
        new = new[: new.index(eos)] if eos in new else new
        answers.append(processor.tokenizer.decode(new, skip_special_tokens=True).strip())
    return answers


@pytest.mark.parametrize("decoder,template", [("vanilla", "chat"), ("himix", "vicuna_v1"), ("proxyv", "plain")])
def test_batched_answers_equal_one_by_one_generation_and_are_scored(data, decoder, template):
    model = build(decoder, seed=3)
    processor = LeanVLMProcessor.for_model(model, tokenizer())
    processor.template = template
    expected = one_by_one(model, processor, LLaVADataset(str(data), processor, template=template), 4)
    assert any(expected)
    records = json.loads(data.read_text())
    for index, record in enumerate(records):  # even records: the model's own answer, restyled; odd: wrong
        record["conversations"][-1]["value"] = f"  {expected[index]}. " if index % 2 == 0 else "never an answer"
    result = evaluate(model, processor, records, str(data.parent), batch_size=3, max_new_tokens=4, progress=False)
    assert [p["prediction"] for p in result["predictions"]] == expected
    assert [p["correct"] for p in result["predictions"]] == [True, False, True, False, True]
    assert (result["samples"], result["correct"], result["accuracy"]) == (5, 3, 0.6)
    assert counts(result["families"]) == {"colour": (2, 2, 1.0), "count": (2, 1, 0.5)}
    assert result["template"] == template


def counts(families: dict) -> dict:
    return {name: (f["samples"], f["correct"], f["accuracy"]) for name, f in families.items()}


def test_normalisation_and_per_family_accounting(data):
    assert normalize("  Red.\n") == normalize("red") == normalize("RED!") == "red"
    assert normalize("two  circles ?") == "two circles"
    assert normalize("3.5") == "3.5" and normalize("red car") != normalize("red")
    asked = questions(json.loads(data.read_text()), "chat", tokenizer(), str(data.parent))
    result = score(asked, ["Red.", "2", "Neither!", "three", "one"])
    assert [p["correct"] for p in result["predictions"]] == [True, False, True, True, True]
    assert (result["samples"], result["correct"], result["accuracy"]) == (5, 4, 0.8)
    # the record without a family counts only overall
    assert counts(result["families"]) == {"colour": (2, 2, 1.0), "count": (2, 1, 0.5)}
    # intervals and answer priors: each family's references are two different answers (the prior is 1/2); the
    # overall prior, with a record outside every family, is the overall majority share (five different answers)
    for family in result["families"].values():
        assert family["ci95"] == list(wilson_interval(family["correct"], family["samples"]))
        assert family["answer_prior"] == 0.5
    assert result["ci95"] == list(wilson_interval(4, 5)) and result["answer_prior"] == 0.2
    asked[1].reference = asked[4].reference = "red"  # "red" is now three of the five references
    assert score(asked, ["x"] * 5)["answer_prior"] == 0.6
    # every record in a family: the families' priors weighted by their size, (2 x 1/2 + 2 x 1) / 4
    with_families = [q for q in asked if q.family is not None]
    assert score(with_families, ["x"] * 4)["answer_prior"] == 0.75
    assert result["predictions"][1] == {"id": "turns", "family": "count", "question": "How many circles?",
                                        "reference": "two", "prediction": "2", "correct": False, "score": 0.0}


def test_records_that_cannot_be_asked_are_named(data):
    root, tok = str(data.parent), tokenizer()
    unanswered = {"id": "open", "conversations": [{"from": "human", "value": "Why?"}]}
    with pytest.raises(ValueError, match=r"record 1 \(id 'open'\): no assistant"):
        questions([RECORDS[3], unanswered], "chat", tok, root, source="q.json")
    with pytest.raises(FileNotFoundError, match=r"id 'lost'.*nowhere\.png"):
        questions([{**RECORDS[0], "id": "lost", "image": "nowhere.png"}], "chat", tok, root)
    with pytest.raises(ValueError, match=r"id 'pair'.*2 <image> placeholder\(s\).*1 image"):
        questions([{**RECORDS[2], "image": "a.png"}], "chat", tok, root)
    with pytest.raises(ValueError, match=r"unknown role 'robot'"):
        questions([{"id": "r", "conversations": [{"from": "robot", "value": "hi"}]}], "chat", tok, root)
    with pytest.raises(ValueError, match="record 0: a record needs a 'conversations' list"):
        questions(["not a record"], "chat", tok, root)


@pytest.fixture
def model_dir(tmp_path):
    model = build("vanilla", seed=5)
    processor = LeanVLMProcessor.for_model(model, tokenizer())
    processor.template = "vicuna_v1"
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_eval_command_prints_a_table_and_writes_the_library_result(data, model_dir, tmp_path):
    out = tmp_path / "results" / "eval.json"
    result = CliRunner().invoke(app, ["eval", str(model_dir), "--data", str(data), "--batch-size", "2",
                                      "--max-new-tokens", "3", "--max-samples", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "overall" in result.output and "colour" in result.output and "count" in result.output
    written = json.loads(out.read_text())
    model = LeanVLMForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = LeanVLMProcessor.from_pretrained(model_dir)
    library = evaluate(model, processor, RECORDS[:4], str(data.parent), max_new_tokens=3, progress=False)
    assert written == {"model": str(model_dir), "decoder": "vanilla", "data": str(data), **library}
    assert written["template"] == "vicuna_v1" and len(written["predictions"]) == 4


def test_eval_runs_a_saved_vanilla_model_under_a_token_reduction_and_refuses_other_parameters(data, model_dir,
                                                                                             tmp_path):
    out = tmp_path / "pool.json"
    args = ["eval", str(model_dir), "--data", str(data), "--max-new-tokens", "3", "--max-samples", "4"]
    result = CliRunner().invoke(app, [*args, "--decoder", "pool+keep_tokens=4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    model = LeanVLMForConditionalGeneration.from_pretrained(model_dir, decoder="pool", keep_tokens=4).eval()
    library = evaluate(model, LeanVLMProcessor.from_pretrained(model_dir), RECORDS[:4], str(data.parent),
                       max_new_tokens=3, progress=False)
    assert written == {"model": str(model_dir), "decoder": "pool+keep_tokens=4", "data": str(data), **library}
    assert model.encode_images(torch.zeros(1, 3, 32, 32)).tokens.shape[1] == 4  # the reduction ran
    refused = CliRunner().invoke(app, [*args, "--decoder", "himix", "--out", str(tmp_path / "himix.json")])
    message = error(refused)
    assert "cannot run as himix: its parameters differ" in message and "missing keys: decoder.vision_kv" in message
    assert not (tmp_path / "himix.json").exists()


def error(result) -> str:
    """A usage error's message, unwrapped from its panel."""
    assert result.exit_code == 2, result.output
    return " ".join(result.output.replace("│", " ").split())


def test_eval_command_rejects_bad_input(data, model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # short relative paths keep the messages on one line of the panel
    build("vanilla").save_pretrained("bare")
    Path("broken.jsonl").write_text(json.dumps(RECORDS[3]) + "\n{oops\n")
    Path("open.json").write_text(json.dumps([{"id": "open", "conversations": [{"from": "human", "value": "Why?"}]}]))

    def run(model, data_file):
        return error(CliRunner().invoke(app, ["eval", model, "--data", data_file]))

    assert "nothing has no config.json" in run("nothing", "data.json")
    assert "bare has no leanvlm_processor.json" in run("bare", "data.json")
    assert "broken.jsonl, line 2: invalid JSON" in run("model", "broken.jsonl")
    assert "(id 'open'): no assistant" in run("model", "open.json")


def test_chat_streams_answers_and_keeps_the_conversation(data, model_dir, monkeypatch):
    prompts, answers = [], []
    original = LeanVLMForConditionalGeneration.generate

    def recording(self, input_ids, *args, **kwargs):
        output = original(self, input_ids, *args, **kwargs)
        prompts.append(input_ids[0].tolist())
        answers.append(processor.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip())
        return output

    monkeypatch.setattr(LeanVLMForConditionalGeneration, "generate", recording)
    processor = LeanVLMProcessor.from_pretrained(model_dir)
    command = ["chat", str(model_dir), "--image", str(data.parent / "a.png"), "--max-new-tokens", "4",
               "--system", "Answer in one word."]
    result = CliRunner().invoke(app, command, input="What is it?\nAnd the colour?\nexit\nNever asked?\n")
    assert result.exit_code == 0, result.output
    assert len(prompts) == 2 and answers[0]
    assert result.stdout == f"{answers[0]}\n{answers[1]}\n"  # stderr holds transformers' loading bar
    # one image, in the first user turn; the second prompt holds the whole first exchange
    assert [p.count(processor.image_token_id) for p in prompts] == [1, 1]
    first, second = (processor.decode(p) for p in prompts)
    assert first.startswith("<s>Answer in one word. USER: <image>\nWhat is it? ASSISTANT:")
    assert second.startswith(first) and f"{answers[0]}</s>USER: And the colour? ASSISTANT:" in second

    prompts.clear()
    for lines in ("What is it?\n", "What is it?\n\nNever asked?\n"):  # end of input and an empty line end it
        assert CliRunner().invoke(app, command, input=lines).exit_code == 0
    assert len(prompts) == 2


def test_chat_rejects_a_missing_image_or_model(data, model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "no.png is not a file" in error(CliRunner().invoke(app, ["chat", "model", "--image", "no.png"]))
    assert "none has no config.json" in error(CliRunner().invoke(app, ["chat", "none", "--image", "a.png"]))


def test_vqa_anls_and_multiple_choice_metrics_score_records_by_their_answers_and_options(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    ten = ["2"] * 3 + ["two dogs"] * 7  # VQAv2-style: ten annotators
    records = [
        {"id": "v", "image": "a.png", "family": "count", "answers": ten,
         "conversations": [{"from": "human", "value": "How many dogs?"}, {"from": "gpt", "value": "2"}]},
        {"id": "o", "image": "a.png", "family": "text", "answers": ["kitten"],
         "conversations": [{"from": "human", "value": "What does it say?"}, {"from": "gpt", "value": "kitten"}]},
    ]
    asked = questions(records, "chat", tokenizer(), str(tmp_path))
    assert asked[0].references == ten and asked[1].references == ["kitten"]
    vqa = score(asked, ["Two.", "sitting"], "vqa")
    # "Two." normalises to "2": 3 agreeing annotators give (3 x 2/3 + 7 x 1) / 10 = 0.9; "sitting" != "kitten": 0
    assert [p["score"] for p in vqa["predictions"]] == pytest.approx([0.9, 0.0])
    assert vqa["accuracy"] == pytest.approx(0.45) and vqa["correct"] == pytest.approx(0.9)
    anls = score(asked, ["Two.", "sitting"], "anls")
    # "sitting" vs "kitten": 3 edits over 7 characters, 1 - 3/7; "two." vs "2": nothing alike, 0
    assert [p["score"] for p in anls["predictions"]] == pytest.approx([0.0, 1 - 3 / 7])
    low, high = anls["ci95"]  # a normal interval around the mean of partial scores, clipped to [0, 1]
    assert low == 0.0 and anls["accuracy"] < high <= 1.0
    options = ["red", "blue", "green"]
    choice = [{"id": i, "image": "a.png", "options": options, "conversations": [
        {"from": "human", "value": "Which colour? A. red B. blue C. green"}, {"from": "gpt", "value": ref}]}
        for i, ref in enumerate(["B", "green", "B"])]
    mc = score(questions(choice, "chat", tokenizer(), str(tmp_path)), ["(B) blue", "C", "blue"],
               "multiple_choice")
    assert [p["correct"] for p in mc["predictions"]] == [True, True, True]
    assert mc["ci95"] == list(wilson_interval(3, 3))
    assert mc["answer_prior"] == pytest.approx(2 / 3)  # always answering "B", the most common reference
    with pytest.raises(ValueError, match="has no 'options'"):
        score(asked, ["a", "b"], "multiple_choice")
    # what a metric reads is checked before any answer is generated, and only by the metric that reads it
    records[0]["answers"] = [{"answer": "2"}]
    check_metric_fields(records, "exact_match")
    with pytest.raises(ValueError, match=r"record 0 \(id 'v'\): 'answers' must be a non-empty list of strings"):
        check_metric_fields(records, "vqa")
    with pytest.raises(ValueError, match="multiple_choice needs 'options'"):
        check_metric_fields(records, "multiple_choice")
    choice[0]["conversations"][-1]["value"] = "purple"
    with pytest.raises(ValueError, match="the reference 'purple' names none"):
        check_metric_fields(choice, "multiple_choice")
    with pytest.raises(ValueError, match="Unknown metric 'bleu'"):
        check_metric_fields(choice, "bleu")
