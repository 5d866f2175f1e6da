"""LLaVA-format data: templates, assistant-only labels, malformed records, images, collation into a model batch."""

import json

import pytest
import torch
from PIL import Image
from tiny import bpe_tokenizer, build

from leanvlm import LeanVLMProcessor
from leanvlm.data.llava import Collator, LLaVADataset, length_grouped_sampler
from leanvlm.decoders.base import IGNORE_INDEX


@pytest.fixture
def setup(tmp_path):
    tokenizer = bpe_tokenizer()
    model = build("vanilla")
    processor = LeanVLMProcessor.for_model(model, tokenizer)
    for name, colour in [("a.png", "red"), ("b.png", "blue")]:
        Image.new("RGB", (40, 30), colour).save(tmp_path / name)
    records = [
        {"id": "one", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the square?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "How many circles?"}, {"from": "gpt", "value": "two"}]},
        {"id": "two", "image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image> and <image>: what color?"}, {"from": "gpt", "value": "blue"}]},
        {"id": "text", "conversations": [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "three"}]},
        {"id": "noplaceholder", "image": "b.png", "conversations": [
            {"from": "human", "value": "What color?"}, {"from": "gpt", "value": "blue"}]},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return model, processor, tokenizer, path


def scored_text(dataset, index, tokenizer):
    ids, labels = dataset.tokenize(index)
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize("template,expected", [
    ("vicuna_v1", [" red</s>", " two</s>"]),
    ("chat", ["red<|im_end|>\n", "two<|im_end|>\n"]),
    ("plain", ["red</s>", "two</s>"]),
])
def test_only_assistant_turns_are_scored(setup, template, expected):
    _, processor, tokenizer, path = setup
    dataset = LLaVADataset(str(path), processor, template=template)
    assert scored_text(dataset, 0, tokenizer) == expected
    ids, _ = dataset.tokenize(0)
    assert ids.count(processor.image_token_id) == 1 and processor.tokenizer_image_id not in ids


def test_images_text_only_and_collation_feed_the_model(setup):
    model, processor, _, path = setup
    dataset = LLaVADataset(str(path), processor, template="vicuna_v1")
    assert [len(dataset[i]["images"]) for i in range(4)] == [1, 2, 0, 1]
    assert dataset.tokenize(3)[0].count(processor.image_token_id) == 1  # placeholder added in front
    batch = Collator(processor)([dataset[i] for i in range(4)])
    assert batch["pixel_values"].shape[0] == 4 and batch["image_crops"].tolist() == [1, 1, 1, 1]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    order = list(length_grouped_sampler(dataset, batch_size=2, seed=0))
    assert sorted(order) == [0, 1, 2, 3]


def test_truncation_is_counted_and_keeps_placeholders_and_images_consistent(setup):
    _, processor, _, path = setup
    dataset = LLaVADataset(str(path), processor, template="vicuna_v1", max_length=5)
    with pytest.warns(UserWarning, match="truncated"):
        samples = [dataset[i] for i in range(4)]
    assert dataset.truncated == 4
    for sample in samples:
        assert len(sample["input_ids"]) == 5
        assert sample["input_ids"].count(processor.image_token_id) == len(sample["images"])


def test_malformed_records_get_clear_errors(setup, tmp_path):
    _, processor, _, _ = setup
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"conversations": []}\n{"conversations": [}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: invalid JSON"):
        LLaVADataset(str(bad_line), processor)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[\n{"conversations": []},\n{oops}\n]')
    with pytest.raises(ValueError, match=r"bad\.json, line 3: invalid JSON"):
        LLaVADataset(str(bad_json), processor)
    role = tmp_path / "role.json"
    role.write_text(json.dumps([{"id": "r1", "conversations": [{"from": "robot", "value": "hi"}]}]))
    with pytest.raises(ValueError, match=r"record 0 \(id 'r1'\): unknown role 'robot'"):
        LLaVADataset(str(role), processor)
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([
        {"id": "ok", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {"id": "m", "image": "nope.png", "conversations": [{"from": "human", "value": "<image>"}]},
    ]))
    with pytest.raises(FileNotFoundError, match=r"record 1 \(id 'm'\): image .*nope.png' not found"):
        LLaVADataset(str(missing), processor)
    kept = LLaVADataset(str(missing), processor, on_missing_image="skip")
    assert len(kept) == 1 and kept.skipped == 1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLaVADataset(str(tmp_path / "absent.json"), processor)


@pytest.mark.parametrize("decoder,options", [("vanilla", {}), ("himix", {"max_crops": 3})])
def test_cached_features_equal_on_the_fly_ones(setup, tmp_path, decoder, options):
    from leanvlm.data.features import FeatureCache, encode_images_to_cache, model_feature_signature

    _, _, tokenizer, path = setup
    model = build(decoder, **options)
    processor = LeanVLMProcessor.for_model(model, tokenizer)
    plain = LLaVADataset(str(path), processor, template="vicuna_v1")
    cache = FeatureCache(str(tmp_path / "features"), model_feature_signature(model, processor))
    counted = []
    encode = (model.vision_model, processor, model.config.feature_layers, model.config.vision_feature_select)
    assert encode_images_to_cache(*encode, plain.image_paths(), cache, batch_size=2, shard_images=1,
                                  progress=counted.append) == 2  # a.png and b.png, once each
    assert counted == [2] and len(set(cache.index.values())) == 1  # both images in one batch and one shard
    assert encode_images_to_cache(*encode, plain.image_paths(), cache) == 0  # nothing left to encode
    reopened = FeatureCache(str(tmp_path / "features"), model_feature_signature(model, processor))
    cached = LLaVADataset(str(path), processor, template="vicuna_v1", feature_cache=reopened,
                          feature_keys=model.config.feature_layers)
    collate = Collator(processor)
    from_pixels = collate([plain[i] for i in range(4)])
    from_cache = collate([cached[i] for i in range(4)])
    assert torch.equal(from_pixels["image_crops"], from_cache["image_crops"])
    with torch.no_grad():
        on_the_fly = model.encode_images(from_pixels["pixel_values"], from_pixels["image_crops"]).tokens
        stored = model.context_from_features(from_cache["vision_features"], from_cache["image_crops"]).tokens
        torch.testing.assert_close(stored, on_the_fly, atol=1e-6, rtol=0)  # batch composition changes the sums
        a = model(**from_pixels).loss
        b = model(**from_cache).loss
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    other = FeatureCache(str(tmp_path / "features"), "another-encoder")
    with pytest.raises(KeyError, match="leanvlm data encode"):
        LLaVADataset(str(path), processor, feature_cache=other, feature_keys=[-2])[0]


def test_data_encode_cli_features_serve_a_model_built_from_the_same_encoder(setup, tmp_path):
    from typer.testing import CliRunner

    from leanvlm import LeanVLMForConditionalGeneration
    from leanvlm.cli import app
    from leanvlm.data.features import FeatureCache, model_feature_signature

    trained, _, tokenizer, path = setup
    encoder_dir = tmp_path / "encoder"
    trained.vision_model.save_pretrained(encoder_dir)
    out = tmp_path / "features"
    command = ["data", "encode", "--data", str(path), "--vision", str(encoder_dir), "--out", str(out),
               "--dtype", "float32", "--batch-size", "1"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert "2 image(s) encoded" in result.output
    settings = json.loads((out / "features.json").read_text())
    assert settings["layers"] == [-2] and settings["images"] == 2
    assert "0 image(s) encoded, 2 already cached" in CliRunner().invoke(app, command).output

    model = LeanVLMForConditionalGeneration.from_parts(trained.language_model, str(encoder_dir)).eval()
    processor = LeanVLMProcessor.for_model(model, tokenizer)
    cache = FeatureCache(str(out), model_feature_signature(model, processor))
    assert cache.signature == settings["signature"]
    cached = LLaVADataset(str(path), processor, feature_cache=cache, feature_keys=[-2])
    plain = LLaVADataset(str(path), processor)
    collate = Collator(processor)
    from_pixels, from_cache = collate([plain[1]]), collate([cached[1]])
    with torch.no_grad():
        expected = model.encode_images(from_pixels["pixel_values"], from_pixels["image_crops"]).tokens
        stored = model.context_from_features(from_cache["vision_features"], from_cache["image_crops"]).tokens
    torch.testing.assert_close(stored, expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_data_encode_cli_writes_the_attention_summary_visionzip_reads(setup, tmp_path):
    from typer.testing import CliRunner

    from leanvlm import LeanVLMForConditionalGeneration
    from leanvlm.cli import app
    from leanvlm.data.features import FeatureCache, model_feature_signature

    trained, _, tokenizer, path = setup
    encoder_dir = tmp_path / "encoder"
    trained.vision_model.save_pretrained(encoder_dir)
    out = tmp_path / "features"
    result = CliRunner().invoke(app, ["data", "encode", "--data", str(path), "--vision", str(encoder_dir), "--out",
                                      str(out), "--dtype", "float32", "--attention-summary", "-2"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "features.json").read_text())["layers"] == [-2, "attention-2"]

    model = LeanVLMForConditionalGeneration.from_parts(trained.language_model, str(encoder_dir),
                                                       decoder="visionzip", keep_tokens=5).eval()
    processor = LeanVLMProcessor.for_model(model, tokenizer)
    cached = LLaVADataset(str(path), processor, feature_keys=model.config.feature_keys,
                          feature_cache=FeatureCache(str(out), model_feature_signature(model, processor)))
    from_pixels, from_cache = Collator(processor)([LLaVADataset(str(path), processor)[1]]), Collator(processor)(
        [cached[1]])
    expected = model.encode_images(from_pixels["pixel_values"], from_pixels["image_crops"]).tokens
    stored = model.context_from_features(from_cache["vision_features"], from_cache["image_crops"]).tokens
    torch.testing.assert_close(stored, expected, atol=1e-6, rtol=0)


def test_data_encode_cli_errors(setup, tmp_path):
    from typer.testing import CliRunner

    from leanvlm.cli import app

    _, _, _, path = setup
    out = str(tmp_path / "features")
    result = CliRunner().invoke(app, ["data", "encode", "--data", str(path), "--out", out])
    assert result.exit_code != 0 and "exactly one of --vision and --model" in result.output
    (tmp_path / "b.png").unlink()
    result = CliRunner().invoke(app, ["data", "encode", "--data", str(path), "--out", out, "--vision", "dinov2-s14"])
    assert result.exit_code != 0 and "record 1 (id 'two')" in " ".join(result.output.replace("│", " ").split())


def test_feature_signature_ignores_how_the_encoder_reached_its_dtype(setup, tmp_path):
    from leanvlm.data.features import feature_signature
    from leanvlm.modeling import load_vision_model

    trained, processor, _, _ = setup
    trained.vision_model.save_pretrained(tmp_path / "encoder")
    loaded_bf16 = load_vision_model(str(tmp_path / "encoder"), torch.bfloat16)  # `leanvlm data encode`
    cast_bf16 = load_vision_model(str(tmp_path / "encoder")).to(torch.bfloat16)  # the trainer
    fp32 = load_vision_model(str(tmp_path / "encoder"))
    assert feature_signature(loaded_bf16, "patch", processor) == feature_signature(cast_bf16, "patch", processor)
    assert feature_signature(fp32, "patch", processor) != feature_signature(cast_bf16, "patch", processor)


def test_two_writers_of_one_feature_cache_keep_each_others_shards(tmp_path):
    from leanvlm.data.features import FeatureCache

    first, second = FeatureCache(str(tmp_path), "a"), FeatureCache(str(tmp_path), "b")  # both read an empty index
    first.add_shard({"x": torch.zeros(2)})
    second.add_shard({"y": torch.ones(3)})
    reopened = FeatureCache(str(tmp_path), "a")
    assert torch.equal(reopened.get("x"), torch.zeros(2)) and torch.equal(reopened.get("y"), torch.ones(3))
