"""Host-side scoring helpers: which image features each `<|image_pad|>` token reads."""

import numpy as np
import pytest

from rwr_jax.train import scoring

IMAGE = 9


def test_identical_prompts_of_two_groups_read_their_own_images():
    """Two records with the same question and image size: equal prompt tokens, but the
    second group's image tokens must read the second prompt's features (ranks 2, 3)."""
    prompts = np.array([[5, IMAGE, IMAGE, 7]] * 4)
    index = scoring.image_feature_index(prompts, 6, IMAGE, group_size=2)
    np.testing.assert_array_equal(index, [[-1, 0, 1, -1, -1, -1]] * 2 + [[-1, 2, 3, -1, -1, -1]] * 2)


def test_ranks_continue_over_prompts_with_different_image_counts():
    prompts = np.array([[0, 0, IMAGE, 7]] * 2 + [[IMAGE, IMAGE, 7, IMAGE]] * 2 + [[3, 4, 5, 7]] * 2)
    index = scoring.image_feature_index(prompts, 4, IMAGE, group_size=2)
    np.testing.assert_array_equal(index, [[-1, -1, 0, -1]] * 2 + [[1, 2, -1, 3]] * 2 + [[-1] * 4] * 2)


def test_rows_of_a_group_must_repeat_one_prompt():
    with pytest.raises(ValueError, match="must repeat one prompt"):
        scoring.image_feature_index(np.array([[1, IMAGE], [2, IMAGE]]), 3, IMAGE, group_size=2)
    with pytest.raises(ValueError, match="must divide the 3 rows"):
        scoring.image_feature_index(np.zeros((3, 2), int), 3, IMAGE, group_size=2)
