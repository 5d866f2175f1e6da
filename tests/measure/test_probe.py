"""The encoder probe reads an answer that the features hold, and cannot invent one they do not."""

import pytest
import torch

from leanvlm.measure.probe import parse_layer_sets, train_probe


def split(n: int, seed: int, informative: bool) -> dict:
    generator = torch.Generator().manual_seed(seed)
    answers = torch.randint(4, (n,), generator=generator)
    features = torch.randn(n, 16, 8, generator=generator)
    if informative:  # token 5 carries the answer; the question (word 1 or 2) says nothing
        features[torch.arange(n), 5, :4] += 3 * torch.nn.functional.one_hot(answers, 4).float()
    questions = [[1 + int(w)] for w in torch.randint(2, (n,), generator=generator)]
    return {"features": features, "questions": questions, "answers": answers}


@pytest.mark.parametrize("informative", [True, False])
def test_probe_accuracy_follows_what_the_features_hold(informative):
    train, test = split(512, 0, informative), split(256, 1, informative)
    predictions = torch.tensor(train_probe(train, test, steps=200, batch_size=32))
    accuracy = (predictions == test["answers"]).float().mean().item()
    if informative:
        assert accuracy > 0.9
    else:
        assert accuracy < 0.4  # chance is 0.25


def test_layer_sets_parse_and_bad_ones_say_how():
    assert parse_layer_sets(["-2", "8,-2"]) == [(-2,), (8, -2)]
    with pytest.raises(ValueError, match="separated by commas"):
        parse_layer_sets(["8;11"])
