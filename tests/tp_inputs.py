"""The inputs of the tensor-parallel comparison, shared by the test and its worker processes."""

import torch
from helpers import left_pad, prompt, video_pixels

GREEDY = dict(max_new_tokens=5, do_sample=False, eos_token_id=None)


def inputs() -> dict:
    (first, first_grid), (second, second_grid) = video_pixels(2, 4, 6), video_pixels(2, 4, 4, seed=3)
    ids, mask = left_pad([prompt(2, 4, seed=1), prompt(5, 2, seed=2)])
    return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=torch.cat([first, second]),
                video_grid_thw=torch.cat([first_grid, second_grid]))
