"""The visual reward's CLIP scoring against transformers' CLIPModel (torch, float32)."""

import types

import numpy as np
import pytest
from PIL import Image

from rwr_jax.data import image_processing
from rwr_jax.models.clip import demo as clip_demo
from rwr_jax.rl import rewards
from rwr_jax.train import visual_scoring

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

G = 2
# Prompt 0: two images; prompt 1: text-only; prompt 2: one image. Rows = 3 prompts x G.
NUM_IMAGES = np.asarray([2, 0, 1], np.int32)
TEXTS = [["three red rings", "Varnel syndrome treatment?"], ["blue dots"], ["x"], [], ["a finding " * 30], []]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The demo CLIP (tokenizer, preprocessor) with weights re-drawn so no tensor is trivial."""
    path = str(tmp_path_factory.mktemp("clip"))
    clip_demo.write_demo_clip(path, seed=0)
    model = transformers.CLIPModel.from_pretrained(path)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = torch.randn(param.shape, generator=gen) * 0.2
            param.copy_(value + 1.0 if "norm" in name and name.endswith("weight") else value)
    model.save_pretrained(path)
    return path


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)) for h, w in ((40, 56), (32, 32), (70, 50))]


def _torch_similarity(path, images):
    """Reference: mean over texts of mean over images of cos(HF text feature, HF image feature)."""
    model = transformers.CLIPModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    processor = transformers.CLIPImageProcessor.from_pretrained(path)
    with torch.no_grad():
        image = model.get_image_features(**processor(images=images, return_tensors="pt"))
        image = image.pooler_output if hasattr(image, "pooler_output") else image
        image = torch.nn.functional.normalize(image, dim=-1)
        per_prompt = {0: image[:2], 2: image[2:]}
        expected = np.zeros(len(TEXTS), np.float64)
        for row, texts in enumerate(TEXTS):
            prompt = row // G
            if not texts or prompt not in per_prompt:
                continue
            encoded = tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
            text = model.get_text_features(**encoded)
            text = text.pooler_output if hasattr(text, "pooler_output") else text
            text = torch.nn.functional.normalize(text, dim=-1)
            expected[row] = (text @ per_prompt[prompt].T).mean().item()
    return expected


def test_similarity_matches_transformers(checkpoint):
    scorer = visual_scoring.load_scorer(checkpoint)
    images = _images()
    pixels = np.zeros((3 * 2, 32, 32, 3), np.float32)  # P x 2 image slots, images in prompt order
    pixels[:3] = image_processing.clip_pixel_values(images, scorer.image_config)
    inputs = scorer.reward_inputs(TEXTS, pixels, NUM_IMAGES, G)
    expected = _torch_similarity(checkpoint, images)
    assert np.all(np.abs(expected[[0, 1, 4]]) > 1e-3)  # non-trivial values
    np.testing.assert_allclose(np.asarray(inputs["image_query_similarity"]), expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(inputs["has_image"]), [True, True, False, False, True, True])
    parsed = types.SimpleNamespace(char_count=np.zeros(len(TEXTS), np.int32))  # the reward reads B only
    reward = rewards.query_visual_reward(parsed, inputs)
    np.testing.assert_allclose(np.asarray(reward), 0.1 * expected, rtol=0, atol=1e-6)
    assert np.asarray(reward)[[2, 3, 5]].tolist() == [0.0, 0.0, 0.0]


def test_text_only_batch_is_zero_without_a_forward(checkpoint):
    scorer = visual_scoring.load_scorer(checkpoint)
    inputs = scorer.reward_inputs([["q"], []], None, np.zeros(1, np.int32), 2)
    np.testing.assert_array_equal(np.asarray(inputs["image_query_similarity"]), [0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(inputs["has_image"]), [False, False])


def test_load_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"rewards.clip_checkpoint is empty"):
        visual_scoring.load_scorer("")
    with pytest.raises(ValueError, match=r"rewards.clip_checkpoint='.*nope' is not a directory"):
        visual_scoring.load_scorer(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"has no config.json"):
        visual_scoring.load_scorer(str(tmp_path))
