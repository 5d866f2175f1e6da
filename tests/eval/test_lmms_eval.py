"""leanvlm in lmms-eval: the `python -m lmms_eval` CLI with the leanvlm plugin on the offline ShapesVQA task scores
every question as `leanvlm eval` does, multiple choice by log-likelihood equals a brute-force forward, and
lmms-eval's OpenAI-compatible model against `leanvlm serve` (loopback, self-stopping) gives the plugin's answers."""

import glob
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from tiny import bpe_tokenizer, build

from leanvlm import LeanVLMProcessor
from leanvlm.data.synthetic import synthesize
from leanvlm.eval.exact_match import encode_prompts, evaluate, load_model
from leanvlm.eval.lmms_model import LeanVLM, LeanVLMSimple, chat_conversation, sampling_options, until_first_stop
from leanvlm.eval.lmms_task import doc_to_messages, docs, log_likelihood, write_task
from leanvlm.serve.server import ServerSettings, build_app, running_server

LIMIT = 14  # two questions per ShapesVQA family


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny HiMix model and a 14-question ShapesVQA test file in which every other reference is the model's
    own greedy answer, so exact match is neither 0 nor 1 and every scored question matters."""
    root = tmp_path_factory.mktemp("lmms")
    synthesize(str(root / "data"), 0, 0, LIMIT, seed=3, image_size=64)
    records = json.loads((root / "data" / "test.json").read_text())
    # a tokenizer that knows every character of the questions and answers (the multiple-choice task scores them)
    corpus = [turn["value"] for record in records for turn in record["conversations"]]
    model = build("himix")
    processor = LeanVLMProcessor.for_model(model, bpe_tokenizer(corpus))
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    answers = evaluate(model, processor, records, str(root / "data"), progress=False)["predictions"]
    for record, answered in zip(records[::2], answers[::2], strict=True):
        record["conversations"][-1]["value"] = answered["prediction"]
    (root / "data" / "test.json").write_text(json.dumps(records))
    write_task(str(root / "data" / "test.json"), str(root / "task"))
    return SimpleNamespace(root=root, model=model, processor=processor, records=records)


def lmms_eval(setup, out: str, *args: str) -> tuple[dict, list[dict]]:
    """Run `python -m lmms_eval` on the task folder in `setup.root`; its aggregated results and per-question
    samples."""
    root = setup.root
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": "unused",
           "HF_DATASETS_CACHE": str(root / "datasets-cache")}
    command = [sys.executable, "-m", "lmms_eval", *args, "--include_path", str(root / "task"),
               "--output_path", str(root / out), "--log_samples", "--limit", str(LIMIT)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    found = glob.glob(str(root / out / "*" / "*_results.json"))
    # lmms-eval logs a failed evaluation and still exits 0: no results file is the failure
    assert done.returncode == 0 and len(found) == 1, done.stdout[-3000:] + done.stderr[-3000:]
    [results] = found
    [samples] = glob.glob(str(root / out / "*" / "*_samples_*.jsonl"))
    with open(samples) as f:
        rows = sorted((json.loads(line) for line in f), key=lambda row: row["doc_id"])
    with open(results) as f:
        return json.load(f)["results"], rows


@pytest.fixture(scope="module")
def plugin_run(setup):
    model_args = f"pretrained={setup.root / 'model'},batch_size=4,dtype=float32,device=cpu"
    return lmms_eval(setup, "plugin", "--model", "leanvlm", "--model_args", model_args, "--tasks",
                     "shapesvqa_leanvlm")


def test_the_plugin_scores_every_question_as_leanvlm_eval_does(setup, plugin_run):
    results, rows = plugin_run
    model, processor = load_model(str(setup.root / "model"))
    expected = evaluate(model.cpu(), processor, setup.records, str(setup.root / "data"), batch_size=4,
                        progress=False)
    assert [row["filtered_resps"] for row in rows] == [p["prediction"] for p in expected["predictions"]]
    assert [row["exact_match"] for row in rows] == [float(p["correct"]) for p in expected["predictions"]]
    task = results["shapesvqa_leanvlm"]
    assert 0 < expected["accuracy"] < 1
    assert task["exact_match,none"] == pytest.approx(expected["accuracy"])
    for family, counts in expected["families"].items():
        assert task[f"exact_match_{family},none"] == pytest.approx(counts["accuracy"])


def test_the_plugin_runs_the_packaged_parts_as_leanvlm_eval_does(tmp_path):
    """SmolLM2-135M-Instruct + DINOv2-S/14 (untrained vision side, real tokenizer and chat template): the same
    answers through lmms-eval as through `leanvlm eval`."""
    from leanvlm.serve.loadtest import LoadSettings, build_model

    model, processor = build_model(LoadSettings(dtype="float32"), "himix")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    synthesize(str(tmp_path / "data"), 0, 0, 7, seed=4, image_size=96)
    write_task(str(tmp_path / "data" / "test.json"), str(tmp_path / "task"))
    _, rows = lmms_eval(SimpleNamespace(root=tmp_path), "plugin", "--model", "leanvlm", "--model_args",
                        f"pretrained={tmp_path / 'model'},batch_size=4,device=cpu", "--tasks", "shapesvqa_leanvlm")
    records = json.loads((tmp_path / "data" / "test.json").read_text())
    expected = evaluate(model, processor, records, str(tmp_path / "data"), batch_size=4, progress=False)
    assert [row["filtered_resps"] for row in rows] == [p["prediction"] for p in expected["predictions"]]
    assert any(p["prediction"] for p in expected["predictions"]), expected["predictions"]  # not all empty


def test_a_served_model_scores_as_the_plugin_through_lmms_evals_openai_model(setup, plugin_run):
    app = build_app(str(setup.root / "model"), ServerSettings(model_name="tiny"))
    with running_server(app) as url:
        results, rows = lmms_eval(setup, "served", "--model", "openai_compatible", "--model_args",
                                  f"model=tiny,base_url={url}/v1,num_concurrent=4,max_retries=1,timeout=60",
                                  "--tasks", "shapesvqa_leanvlm")
    plugin_results, plugin_rows = plugin_run
    assert [row["filtered_resps"] for row in rows] == [row["filtered_resps"] for row in plugin_rows]
    assert results["shapesvqa_leanvlm"]["exact_match,none"] == plugin_results["shapesvqa_leanvlm"]["exact_match,none"]


def test_multiple_choice_ranks_the_choices_by_the_models_own_log_likelihood(setup):
    results, rows = lmms_eval(setup, "mc", "--model", "leanvlm", "--model_args",
                              f"pretrained={setup.root / 'model'},dtype=float32,device=cpu", "--batch_size", "3",
                              "--force_simple", "--tasks", "shapesvqa_leanvlm_mc")
    model, processor = load_model(str(setup.root / "model"))
    model = model.cpu()
    task = task_docs(setup)
    correct = []
    for row, doc in zip(rows, task, strict=True):
        brute = [continuation_log_prob(model, processor, doc, choice) for choice in doc["choices"]]
        scored = [log_likelihood(resp) for resp in row["filtered_resps"]]
        assert scored == pytest.approx(brute, abs=1e-4)
        correct.append(max(range(len(brute)), key=brute.__getitem__) == doc["choices"].index(doc["answer"]))
    assert results["shapesvqa_leanvlm_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))


def continuation_log_prob(model, processor, doc, choice: str) -> float:
    """log p(choice | the question alone, asked with the model's template), summed token by token from one
    unpadded forward: the reference for the plugin's batched, left-padded loglikelihood."""
    from leanvlm.data.templates import generation_prompt, with_image_placeholders

    users = [m for m in json.loads(doc["messages"]) if m["role"] == "user"]
    question = users[-1]["content"].replace("<image>", "").strip()
    messages = [{"role": "user", "content": with_image_placeholders([question], len(doc["images"]))}]
    prompt = encode_prompts(processor, [generation_prompt(messages, processor.template, processor.tokenizer)])[0][0]
    target = processor.tokenizer(choice, add_special_tokens=False)["input_ids"]
    ids = torch.cat([prompt, torch.tensor(target)])[None]
    pixel_values, crops = processor.preprocess_images([Image.open(p).convert("RGB") for p in doc["images"]])
    with torch.no_grad():
        logits = model(ids, pixel_values=pixel_values, image_crops=crops).logits[0].double()
    log_probs = torch.log_softmax(logits[-len(target) - 1 : -1], dim=-1)
    return float(sum(log_probs[i, t] for i, t in enumerate(target)))


# --- the plugin's pieces, without the CLI ------------------------------------------------------------------------

def plugin(setup, simple=False):
    cls = LeanVLMSimple if simple else LeanVLM
    lm = cls.create_from_arg_string(f"pretrained={setup.root / 'model'},batch_size=2,device=cpu", {"batch_size": 1})
    documents = task_docs(setup)
    lm.task_dict = {"t": {"test": documents}}
    return lm, documents


def task_docs(setup) -> list[dict]:
    return [json.loads(line) for line in (setup.root / "task" / "docs.jsonl").read_text().splitlines()]


def request(*args):
    return SimpleNamespace(args=args)


def test_model_args_win_over_the_clis_defaults_and_unknown_args_are_named(setup):
    lm, _ = plugin(setup)
    assert lm.batch_size == 2  # the CLI's --batch_size default (1) does not override model_args
    assert LeanVLM.create_from_arg_string(f"pretrained={setup.root / 'model'}", {"batch_size": 3}).batch_size == 3
    with pytest.raises(ValueError, match="Unknown model_args for leanvlm: colour"):
        LeanVLM.create_from_arg_string(f"pretrained={setup.root / 'model'},colour=red")
    with pytest.raises(ValueError, match="fixed batch_size"):
        LeanVLM.create_from_arg_string(f"pretrained={setup.root / 'model'},batch_size=auto")


def test_chat_messages_become_the_prompt_leanvlm_eval_asks(setup):
    from leanvlm.eval.exact_match import conversations

    asked = conversations(setup.records, str(setup.root / "data"))
    for doc, conversation in zip(docs(setup.records, str(setup.root / "data")), asked, strict=True):
        messages, images = chat_conversation(doc_to_messages(doc))
        assert messages == conversation.messages
        assert len(images) == len(conversation.images) and all(i.mode == "RGB" for i in images)
    with pytest.raises(ValueError, match="not video"):
        chat_conversation([{"role": "user", "content": [{"type": "video", "url": "v.mp4"}]}])


def test_records_whose_images_sit_inside_the_text_are_refused_with_the_reason(setup, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    record = {"id": "mid", "image": "a.png", "conversations": [
        {"from": "human", "value": "Left: <image> which colour?"}, {"from": "gpt", "value": "red"}]}
    with pytest.raises(ValueError, match=r"record id 'mid'.*images before the text"):
        docs([record], str(tmp_path))
    record["conversations"][0]["value"] = "<image>"
    with pytest.raises(ValueError, match=r"record id 'mid': a message holds only <image>"):
        docs([record], str(tmp_path))
    record["conversations"][0]["value"] = "<image>\n  Which colour?  "  # text kept as written, spaces included
    [doc] = docs([record], str(tmp_path))
    assert chat_conversation(doc_to_messages(doc))[0] == [{"role": "user", "content": "<image>\n  Which colour?  "}]


def test_generation_kwargs_stop_strings_and_sampling(setup):
    assert until_first_stop("red\n\nblue. green", ["\n\n"]) == "red"
    assert until_first_stop("red. blue", ".") == "red"
    assert until_first_stop("red", []) == until_first_stop("red \n\n", None) == "red"
    assert sampling_options({"temperature": 0, "max_new_tokens": 5}) == {"max_new_tokens": 5}
    assert sampling_options({"temperature": 0.7, "do_sample": False}) == {"max_new_tokens": 128}
    assert sampling_options({"temperature": 0.7, "top_p": 0.9, "top_k": 5}) == {
        "max_new_tokens": 128, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 5}
    with pytest.raises(ValueError, match="num_beams"):
        sampling_options({"num_beams": 3})


def test_multi_round_answers_each_round_as_its_own_chat(setup):
    """Sample i runs i + 1 rounds: round 0 asks the document's question, each later round quotes the answers so
    far; then the task says stop. Each round's answer must equal its chat asked alone, and each round must be
    handed the answers before it."""
    lm, _ = plugin(setup)
    seen = []

    def rounds_for(i):
        def doc_to_messages_rounds(doc, round_idx=None, previous_output=None, previous_round_info=None):
            first = doc_to_messages(doc)
            if round_idx is None:
                return first
            seen.append((i, round_idx, list(previous_output), previous_round_info))
            if round_idx > i:
                return None, True, None, None
            text = f"You said {previous_output!r}. Again: {first[-1]['content'][-1]['text']}"
            return [{"role": "user", "content": [{"type": "text", "text": text}]}], False, None, {"round": round_idx}
        return doc_to_messages_rounds

    gen = {"max_new_tokens": 4, "temperature": 0, "until": []}
    rounds = lm.generate_until_multi_round([request("", rounds_for(i), gen, i, "t", "test") for i in range(3)])
    assert [len(r) for r in rounds] == [1, 2, 3]
    for i, answers in enumerate(rounds):
        calls = [(r, previous, info) for j, r, previous, info in seen if j == i]
        assert calls == [(r, answers[:r], None if r == 1 else {"round": r - 1}) for r in range(1, i + 2)]
        for r, text in enumerate(answers):
            alone = (lambda doc, r=r, f=rounds_for(i), a=answers: f(doc, r, a[:r], None)[0]) if r else doc_to_messages
            assert text == lm.generate_until([request("", alone, gen, i, "t", "test")])[0]


def test_loglikelihood_of_the_greedy_answer_is_greedy_and_equals_step_by_step_forwards(setup):
    """The model's own greedy continuation (found token by token with unpadded full forwards) is greedy by the
    plugin's check, and its log-probability equals the sum of those steps' log-probabilities; a different
    continuation is not greedy."""
    lm, documents = plugin(setup, simple=True)
    model, processor = lm.model, lm.processor
    doc = documents[1]
    context = doc_to_messages(doc)[-1]["content"][-1]["text"]
    from leanvlm.data.templates import generation_prompt, with_image_placeholders

    messages = [{"role": "user", "content": with_image_placeholders([context], 1)}]
    ids, _ = encode_prompts(processor, [generation_prompt(messages, processor.template, processor.tokenizer)])
    image = [Image.open(doc["images"][0]).convert("RGB")]
    pixel_values, crops = processor.preprocess_images(image)
    steps, log_prob, current = [], 0.0, ids
    with torch.no_grad():  # greedy, one token at a time, from full forwards
        for _ in range(3):
            logits = model(current, pixel_values=pixel_values, image_crops=crops).logits[0, -1].double()
            token = int(logits.argmax())
            log_prob += float(torch.log_softmax(logits, -1)[token])
            steps.append(token)
            current = torch.cat([current, torch.tensor([[token]])], dim=1)
    continuation = processor.tokenizer.decode(steps)
    assert processor.tokenizer(continuation, add_special_tokens=False)["input_ids"] == steps  # round-trips
    to_visual = lambda d: [Image.open(d["images"][0])]  # noqa: E731
    other = processor.tokenizer.decode([(steps[0] + 1) % 60 + 5])
    scored = lm.loglikelihood([request(context, continuation, to_visual, 1, "t", "test"),
                               request(context, other, to_visual, 1, "t", "test")])
    assert scored[0][1] is True and scored[1][1] is False
    assert scored[0][0] == pytest.approx(log_prob, abs=1e-4)
    lm.processor.template = "vicuna_v1"  # the answer follows "ASSISTANT:" after a space that BPE merges into it
    vicuna = lm._answer_ids(messages, "red")
    assert vicuna == processor.tokenizer(" red", add_special_tokens=False)["input_ids"]
    assert vicuna != processor.tokenizer("red", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="--force_simple"):
        plugin(setup)[0].loglikelihood([request(context, continuation, to_visual, 1, "t", "test")])
