"""Sampling helpers: left padding and cutting responses after the first stop token."""

import torch

from rlhf.generation import pad_batch, truncate_after_stop

PAD, EOS = 0, 9


def test_pad_batch_left_and_right():
    ids, mask = pad_batch([[5, 6, 7], [8]], PAD, side="left")
    assert ids.tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[5, 6, 7], [8]], PAD, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_truncate_keeps_first_eos_and_masks_the_rest():
    responses = torch.tensor([
        [4, EOS, 5, EOS],  # stops at position 1; later tokens are junk
        [4, 5, 6, 7],  # never stops
        [EOS, 3, 3, 3],  # stops immediately
    ])
    ids, mask, ended = truncate_after_stop(responses, [EOS], PAD)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ids.tolist() == [[4, EOS, PAD, PAD], [4, 5, 6, 7], [EOS, PAD, PAD, PAD]]
    assert ended.tolist() == [True, False, True]


def test_any_of_several_stop_tokens_ends_a_response():
    ids, mask, ended = truncate_after_stop(torch.tensor([[4, 8, 5]]), [EOS, 8], PAD)
    assert mask.tolist() == [[1, 1, 0]]
    assert ended.tolist() == [True]
