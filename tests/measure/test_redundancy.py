"""`leanvlm analyze redundancy` and the statistics behind it."""

import json

import pytest
import torch
import torch.nn.functional as F
from tiny import build, left_padded, pixels, prompt, word_tokenizer
from typer.testing import CliRunner

from leanvlm import LeanVLMProcessor
from leanvlm.cli import app
from leanvlm.measure.redundancy import RedundancyStats


def test_statistics_equal_a_direct_computation():
    model = build("vanilla")
    ids, mask = left_padded([prompt(model, 5, "<image>", 7, 8), prompt(model, "<image>", 9)])
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(2))
    stats = RedundancyStats()
    stats.add(model, batch)
    result = stats.result()
    assert result["samples"] == 2 and len(result["layers"]) == 3
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    layer = 2
    h, prev = out.hidden_states[layer], out.hidden_states[layer - 1]
    vision = out.vision_mask & out.attention_mask
    text = ~out.vision_mask & out.attention_mask
    expected = F.cosine_similarity(h[vision], prev[vision], dim=-1).mean().item()
    assert result["layers"][layer - 1]["vision_vs_previous"] == pytest.approx(expected, abs=1e-5)
    expected = F.cosine_similarity(h[text], out.hidden_states[0][text], dim=-1).mean().item()
    assert result["layers"][layer - 1]["text_vs_input"] == pytest.approx(expected, abs=1e-5)
    cross = [F.cosine_similarity(h[b][vision[b]].mean(0), h[b][text[b]].mean(0), dim=0) for b in range(2)]
    assert result["layers"][layer - 1]["cross_modal"] == pytest.approx(torch.stack(cross).mean().item(), abs=1e-5)


def test_cli_writes_table_json_and_plot(tmp_path):
    model = build("vanilla")
    model.save_pretrained(tmp_path / "model")
    LeanVLMProcessor.for_model(model, word_tokenizer()).save_pretrained(tmp_path / "model")
    result = CliRunner().invoke(app, ["analyze", "redundancy", str(tmp_path / "model"), "--samples", "3",
                                      "--prompt", "<image> what is this ?", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "Layer-wise cosine similarity (3 samples)" in result.output
    data = json.loads((tmp_path / "out" / "redundancy.json").read_text())
    assert data["samples"] == 3 and data["decoder"] == "vanilla" and len(data["layers"]) == 3
    assert all(-1 <= row["vision_vs_previous"] <= 1 for row in data["layers"])
    assert (tmp_path / "out" / "redundancy.png").stat().st_size > 10_000


def test_decoders_without_vision_states_are_refused():
    model = build("himix")
    batch = dict(input_ids=torch.tensor([prompt(model, 5, "<image>", 7)]), pixel_values=pixels(1))
    with pytest.raises(ValueError, match="keeps no vision tokens"):
        RedundancyStats().add(model, batch)
