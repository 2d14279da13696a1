"""Category mIoU from the confusion matrix against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from wsss_adapters.driving import DrivingDomain
from wsss_adapters.driving.labels import CAMVID, CITYSCAPES, CITYSCAPES_CATEGORIES

from wsss_domains.domains.contract import BackgroundMode, LabelSpace

# train ids: 0 road, 1 sidewalk, 2 building, 8 vegetation, 10 sky, 11 person, 13 car, 14 truck


def test_cityscapes_categories_follow_the_official_table():
    assert CITYSCAPES_CATEGORIES == {
        "flat": (0, 1),
        "construction": (2, 3, 4),
        "object": (5, 6, 7),
        "nature": (8, 9),
        "sky": (10,),
        "human": (11, 12),
        "vehicle": (13, 14, 15, 16, 17, 18),
    }


def test_category_miou_hand_computed():
    conf = torch.zeros(19, 19, dtype=torch.long)
    conf[0, 0] = 10  # road -> road
    conf[0, 1] = 5  # road -> sidewalk: a class error, a flat hit
    conf[13, 14] = 4  # car -> truck: a vehicle hit
    conf[11, 13] = 2  # person -> car: human miss, vehicle false positive
    conf[10, 10] = 6  # sky
    conf[2, 8] = 3  # building -> vegetation: construction miss, nature false positive
    (result,) = DrivingDomain().metrics(conf, CITYSCAPES)
    assert result.name == "category_mIoU"
    per = result.per_class
    assert per["flat"] == 1.0
    assert per["vehicle"] == pytest.approx(4 / 6)
    assert per["human"] == 0.0 and per["construction"] == 0.0 and per["nature"] == 0.0
    assert per["sky"] == 1.0
    assert math.isnan(per["object"])  # absent from ground truth and prediction: not averaged
    assert result.value == pytest.approx((1 + 4 / 6 + 0 + 1 + 0 + 0) / 6)


def test_camvid_grouping():
    conf = torch.zeros(11, 11, dtype=torch.long)
    conf[3, 4] = 8  # Road -> Pavement: flat hit
    conf[9, 10] = 2  # Pedestrian -> Bicyclist: human hit
    conf[8, 9] = 2  # Car -> Pedestrian: vehicle miss, human false positive
    (result,) = DrivingDomain().metrics(conf, CAMVID)
    assert result.per_class["flat"] == 1.0
    assert result.per_class["human"] == pytest.approx(0.5)
    assert result.per_class["vehicle"] == 0.0
    assert result.value == pytest.approx(0.5)


def test_shape_checked_and_other_label_spaces_get_nothing():
    with pytest.raises(ValueError, match="19 classes"):
        DrivingDomain().metrics(torch.zeros(11, 11), CITYSCAPES)
    other = LabelSpace(
        classes=("x", "y"), palette=((0, 0, 0), (1, 1, 1)), background_mode=BackgroundMode.NONE
    )
    assert DrivingDomain().metrics(torch.eye(2), other) == []
