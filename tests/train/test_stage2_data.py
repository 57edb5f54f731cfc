"""Stage-2 data helpers: box text round trip, invalid boxes, the projector's merged grid."""

from __future__ import annotations

import math

import torch

from train.data.regions import box_iou, box_text, parse_box, valid_box
from train.model.projector import PatchMerger, merged_tokens


def test_box_text_round_trip_on_the_1000_grid() -> None:
    t = box_text((0.1, 0.25, 0.5, 1.0))
    assert t == "<box>(100,250),(500,1000)</box>"
    assert parse_box(f"it is at {t}.") == (0.1, 0.25, 0.5, 1.0)
    assert parse_box("no box here") is None
    assert box_iou((0, 0, 0.5, 0.5), (0, 0, 0.5, 0.5)) == 1.0


def test_invalid_boxes_are_rejected() -> None:
    assert valid_box((0.1, 0.1, 0.2, 0.2))
    for bad in [(0.2, 0.1, 0.1, 0.2), (0, 0, 1.5, 1), (math.nan, 0, 1, 1), (None, 0, 1, 1), (0, 0, 0, 1)]:
        assert not valid_box(bad)


def test_projector_merges_2x2_with_padding() -> None:
    assert merged_tokens(8, 8) == 16 and merged_tokens(3, 5) == 6
    out = PatchMerger(8, 12)(torch.randn(3, 5, 8))
    assert out.shape == (6, 12)
