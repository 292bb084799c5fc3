"""The Med-RwR prompt: system prompts and the Qwen2.5-VL ChatML template.

A prompt is `<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n`, then
per image `<|vision_start|>` + N x `<|image_pad|>` + `<|vision_end|>`, then the
question and `<|im_end|>\\n<|im_start|>assistant\\n` (METHOD.md, "Prompt").
"""

from __future__ import annotations

from collections.abc import Sequence
import operator

import numpy as np
import transformers

from rwr_jax.data import tokenizer as tokenizer_lib

_OUTPUT_SHAPES = (
    "Your output must take one of these two forms.\n"
    "Without retrieval:\n"
    "<think> your reasoning </think> <answer> the option letter and text </answer>\n"
    "With retrieval:\n"
    "<think> your reasoning </think> <query> one search query </query> "
    "<retrieve> retrieved documents </retrieve> <think> your reasoning </think> "
    "<answer> the option letter and text </answer>\n"
    "The <think> <query> <retrieve> cycle may repeat before the answer."
)


def _system_prompt(subject: str, observe: str) -> str:
    return (
        f"You are a medical expert. Answer the multiple-choice question {subject}by choosing the one "
        f"correct option. {observe}Think step by step inside <think> </think>. Whenever you need "
        "medical knowledge that you do not have, write one search query inside <query> </query>; an "
        "external search agent then returns relevant documents inside <retrieve> </retrieve>. Do not "
        "write <retrieve> blocks yourself. You may think, search and read the results several times. "
        "When you are confident, give the final answer inside <answer> </answer> as the option letter "
        "followed by the option text, for example <answer> B. Pneumonia </answer>.\n" + _OUTPUT_SHAPES
    )


# The multimodal (stage 2 and evaluation) system prompt.
DEFAULT_SYSTEM_PROMPT = _system_prompt(
    "about the given medical image ", "First observe the image carefully. "
)
# The text-only (stage 1) system prompt.
DEFAULT_TEXT_SYSTEM_PROMPT = _system_prompt("", "")


def build_prompt(
    question: str,
    image_token_counts: Sequence[int] = (),
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> str:
    """Builds the ChatML prompt text, ending where the assistant starts writing.

    Args:
        question: The user's question (stem and options). Must not contain
            Qwen2.5-VL special token strings such as `<|image_pad|>`.
        image_token_counts: For each image, in order, the number of
            `<|image_pad|>` tokens (merged vision patches) it takes; each >= 1.
            Images are placed before the question. Empty for text-only prompts.
        system_prompt: The system turn text; same restriction as `question`.

    Returns:
        The prompt string.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If a count is < 1 or a text holds a special token string.
    """
    _check_text("question", question)
    _check_text("system_prompt", system_prompt)
    counts = _check_counts(image_token_counts)
    images = "".join(f"<|vision_start|>{'<|image_pad|>' * count}<|vision_end|>" for count in counts)
    return (
        f"<|im_start|>system\n{system_prompt}<|im_end|>\n"
        f"<|im_start|>user\n{images}{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def encode_prompt(
    tokenizer: transformers.PreTrainedTokenizerBase,
    question: str,
    image_token_counts: Sequence[int] = (),
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> np.ndarray:
    """Builds the prompt (see `build_prompt`) and tokenises it.

    Args:
        tokenizer: A Qwen2.5-VL tokenizer, e.g. from `tokenizer.load_tokenizer`.
        question: The user's question.
        image_token_counts: `<|image_pad|>` tokens per image, in order.
        system_prompt: The system turn text.

    Returns:
        `[T] int32` prompt token ids, special tokens as single ids.

    Raises:
        ValueError: If the tokenizer does not map `<|image_pad|>` to one id
            151655 per requested image token.
    """
    counts = _check_counts(image_token_counts)
    prompt = build_prompt(question, counts, system_prompt)
    prompt_ids = np.asarray(tokenizer.encode(prompt, add_special_tokens=False), dtype=np.int32)
    num_pads = int(np.sum(prompt_ids == tokenizer_lib.IMAGE_PAD_ID))
    if num_pads != sum(counts):
        raise ValueError(
            f"tokenizer must encode <|image_pad|> as id {tokenizer_lib.IMAGE_PAD_ID}: expected "
            f"{sum(counts)} such ids for image_token_counts={list(counts)}, got {num_pads}"
        )
    return prompt_ids


def _check_text(name: str, text: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}: {text!r}")
    found = [token for token in tokenizer_lib.SPECIAL_TOKENS if token in text]
    if found:
        raise ValueError(f"{name} must not contain special token strings, got {found} in {text[:200]!r}")


def _check_counts(image_token_counts: Sequence[int]) -> tuple[int, ...]:
    if isinstance(image_token_counts, (str, bytes)) or not isinstance(image_token_counts, (Sequence, np.ndarray)):
        raise TypeError(
            f"image_token_counts must be a sequence of ints, got {type(image_token_counts).__name__}: "
            f"{image_token_counts!r}"
        )
    counts = []
    for index, count in enumerate(image_token_counts):
        if isinstance(count, (bool, np.bool_)):
            raise TypeError(f"image_token_counts[{index}] must be an int, got bool {count!r}")
        try:
            count = operator.index(count)
        except TypeError:
            raise TypeError(
                f"image_token_counts[{index}] must be an int, got {type(count).__name__}: {count!r}"
            ) from None
        if count < 1:
            raise ValueError(f"image_token_counts[{index}] must be >= 1, got {count}")
        counts.append(count)
    return tuple(counts)
