"""Vote boxes, delta coding and clipping: exact values."""

from __future__ import annotations

import torch

from dpl_tools.boxes import NUM_VOTE_BOXES, clip_boxes, decode_deltas, encode_deltas, vote_boxes


def test_six_context_boxes_of_a_known_box():
    box = torch.tensor([[10.0, 20.0, 110.0, 70.0]])  # w = 100, h = 50: f*w = 6, f*h = 3
    votes = vote_boxes(box, factor=0.06)
    expected = torch.tensor(
        [
            [10, 20, 110, 70],  # the box itself
            [4, 17, 104, 67],  # up-left
            [16, 17, 116, 67],  # up-right
            [4, 23, 104, 73],  # down-left
            [16, 23, 116, 73],  # down-right
            [4, 17, 116, 73],  # enlarged by f on every side
            [-2, 14, 122, 76],  # enlarged by 2f on every side
        ],
        dtype=torch.float32,
    )
    assert votes.shape == (1, NUM_VOTE_BOXES, 4)
    torch.testing.assert_close(votes[0], expected)


def test_vote_boxes_clamp_tiny_sizes_to_one_pixel():
    votes = vote_boxes(torch.tensor([[5.0, 5.0, 5.5, 5.0]]), factor=0.06)
    torch.testing.assert_close(votes[0, 1], torch.tensor([4.94, 4.94, 5.44, 4.94]))
    torch.testing.assert_close(votes[0, 6], torch.tensor([4.88, 4.88, 5.62, 5.12]))


def test_delta_coding_known_values_and_round_trip():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    targets = torch.tensor([[1.0, 1.0, 11.0, 11.0]])
    torch.testing.assert_close(encode_deltas(targets, boxes), torch.tensor([[0.1, 0.1, 0.0, 0.0]]))
    wider = torch.tensor([[-5.0, 0.0, 15.0, 10.0]])  # same centre, twice as wide
    d = encode_deltas(wider, boxes)
    torch.testing.assert_close(d, torch.tensor([[0.0, 0.0, torch.log(torch.tensor(2.0)), 0.0]]))

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=g) * 50], 1)
    targets = boxes + torch.randn(50, 4, generator=g) * 3
    targets[:, 2:] = torch.maximum(targets[:, 2:], targets[:, :2] + 1)
    torch.testing.assert_close(decode_deltas(encode_deltas(targets, boxes), boxes), targets)
    assert encode_deltas(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)
    assert decode_deltas(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)


def test_clipping_to_the_image():
    boxes = torch.tensor([[-5.0, -3.0, 120.0, 90.0], [10.0, 10.0, 20.0, 20.0]])
    clipped = clip_boxes(boxes, (80, 100))  # (height, width)
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 0.0, 100.0, 80.0], [10, 10, 20, 20.0]]))
