"""service.domain.trainings: a request's options are validated and resolved once, and stored resolved."""

from __future__ import annotations

import pytest

from service.domain import trainings
from service.errors import InvalidRequest


def test_request_stores_the_resolved_config(session, settings, pets):
    t = trainings.request(session, "pets", {}, settings)
    assert t.options["mode"] == "linear" and t.options["image_size"] == 288
    assert t.options["precision"] == "int8" and t.options["pooling"] == "avgmax"
    assert t.options["crop_fraction"] == 0.875 and t.options["batch_size"] == 32
    assert t.options["augmentation"] == "crop+flip"
    assert trainings.describe(session, t)["options"] == t.options
    assert None not in (t.options[k] for k in ("mode", "image_size", "precision", "pooling", "batch_size"))


def test_finetune_and_simple_cnn_defaults_are_concrete(session, settings, pets):
    t = trainings.request(session, "pets", {"architecture": "simple_cnn"}, settings)
    assert (t.options["mode"], t.options["image_size"], t.options["epochs"], t.options["precision"]) == ("finetune", 64, 40, "fp32")
    assert t.options["learning_rate"] == 3e-3 and t.options["width"] == 32


def test_other_pretrained_weights_resolve_to_float32(session, pets, monkeypatch, tmp_path):
    from service.config import Settings

    custom = Settings(pretrained_weights=tmp_path / "weights.pth")
    assert trainings.request(session, "pets", {}, custom).options["precision"] == "fp32"
    assert trainings.request(session, "pets", {"precision": "int8"}, custom).options["precision"] == "int8"


def test_invalid_options_are_refused_with_the_field(session, settings, pets):
    with pytest.raises(InvalidRequest) as e:
        trainings.request(session, "pets", {"image_size": 4}, settings)
    assert e.value.code == "invalid_training_option" and e.value.details == {"field": "image_size"}
