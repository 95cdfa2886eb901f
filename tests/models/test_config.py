import pytest

from models.config import InvalidTrainConfig, TrainConfig


def test_config_validation_and_dict_roundtrip():
    cfg = TrainConfig(architecture="simple_cnn", epochs=3, augmentation="flip")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict({"learning_rate": 1, "time_budget_s": 60}).learning_rate == 1  # ints are fine as floats
    bad = [
        ({"architecture": "alexnet9000"}, "architecture"),
        ({"mode": "magic"}, "mode"),
        ({"architecture": "simple_cnn", "mode": "linear"}, "mode"),
        ({"epochs": 0}, "epochs"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"val_fraction": 0.9}, "val_fraction"),
        ({"augmentation": "mixup"}, "augmentation"),
        ({"image_size": 4}, "image_size"),
        ({"colour": "red"}, "colour"),
        ({"epochs": "ten"}, "epochs"),
        ({"epochs": True}, "epochs"),
        ({"augmentation": ["flip"]}, "augmentation"),
        ({"seed": 1.5}, "seed"),
    ]
    for fields, field in bad:
        with pytest.raises(InvalidTrainConfig) as e:
            TrainConfig.from_dict(fields)
        assert e.value.field == field


def test_resolved_defaults():
    lite = TrainConfig().resolved()
    assert (lite.mode, lite.image_size, lite.pooling, lite.crop_fraction, lite.resize) == ("linear", 288, "avgmax", 0.875, "center_crop")
    cnn = TrainConfig(architecture="simple_cnn").resolved()
    assert (cnn.mode, cnn.image_size, cnn.crop_fraction, cnn.width, cnn.epochs, cnn.augmentation) == ("finetune", 64, 1.0, 32, 40, "crop+flip")
    ft = TrainConfig(mode="finetune", augmentation=False).resolved()
    assert (ft.image_size, ft.pooling, ft.epochs, ft.augmentation) == (224, "avg", 6, "none")
    assert TrainConfig(image_size=320, l2=0.1).resolved().image_size == 320
    assert TrainConfig().resolved().resolved() == TrainConfig().resolved()  # idempotent
