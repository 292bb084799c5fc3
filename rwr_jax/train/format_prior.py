"""A Med-RwR format prior for randomly initialised demo models.

A random model never writes `<query> … </query>`, so a CPU demo from random weights
would never exercise retrieval rounds. This turns the embedding table and LM head of a
random decoder into a noisy *bigram model of Med-RwR-shaped text* (think / query /
answer blocks): each template token gets its own residual direction, and the LM head
maps that direction to the template's next-token counts. Every other token falls back
to "start a block". The decoder layers keep their small random weights, so outputs
vary and GRPO has something to learn. Real runs start from a checkpoint instead.
"""

import collections

import numpy as np

# (text, weight): the tags tokenise into shared pieces (`<th` `ink` `>`, ` </` `query` `>`),
# so a bigram walk often drifts out of a query before closing it; weighting the query
# templates keeps complete `<query> … </query>` blocks common in the demo's rollouts.
TEMPLATES = (
    ("<think> The finding points to a condition. </think><query> finding condition treatment </query>", 3),
    ("<think> The retrieved text names the treatment. </think><answer> B. treatment </answer><|im_end|>", 1),
    ("<think> I know this case. </think><answer> A. treatment </answer><|im_end|>", 1),
    ("<think> Check the options. </think><query> condition </query>", 3),
    ("<think> The options fit C. </think><answer> C. condition </answer><|im_end|>", 1),
)


def apply_format_prior(params: dict, tokenizer, *, strength: float = 20.0, embed_scale: float = 4.0) -> dict:
    """Returns params whose embeddings + LM head encode a bigram model of TEMPLATES.

    Args:
      params: DecoderLM / VisionLanguageLM params with an untied `lm_head` and
        hidden size >= the number of distinct template tokens + 1.
      tokenizer: the tokenizer the templates are encoded with.
      strength: logit of the template continuations over the rest of the vocabulary
        (e^20 >> 152k tokens, so the template carries nearly all the mass).
      embed_scale: norm scale of the template directions in the embedding table.

    Returns:
      A new param tree (other leaves shared).
    """
    if "lm_head" not in params:
        raise ValueError("the format prior needs an untied lm_head (tie_word_embeddings=False)")
    embedding = np.array(params["model"]["embed_tokens"]["embedding"], np.float32)
    kernel = np.array(params["lm_head"]["kernel"], np.float32)
    vocab, width = embedding.shape
    sequences = [(tokenizer.encode(text, add_special_tokens=False), weight) for text, weight in TEMPLATES]
    distinct = sorted({t for seq, _ in sequences for t in seq})
    if len(distinct) + 1 > width:
        raise ValueError(f"the format prior needs hidden_size >= {len(distinct) + 1}, got {width}")
    slot = {token: i + 1 for i, token in enumerate(distinct)}  # slot 0: every other token
    counts = collections.defaultdict(collections.Counter)
    for seq, weight in sequences:
        counts[0][seq[0]] += weight
        for prev, nxt in zip(seq, seq[1:]):
            counts[slot[prev]][nxt] += weight
    directions = np.zeros((vocab, width), np.float32)
    directions[:, 0] = embed_scale
    for token, s in slot.items():
        directions[token] = 0.0
        directions[token, s] = embed_scale
    embedding = 0.1 * embedding + directions
    kernel = 0.1 * kernel
    kernel[:len(slot) + 1] = 0.0
    for s, following in counts.items():
        total = sum(following.values())
        for token, n in following.items():
            # The final RMSNorm turns a one-hot direction into sqrt(width) at its slot.
            kernel[s, token] = (strength + np.log(n / total)) / np.sqrt(width)
    params = dict(params)
    params["model"] = dict(params["model"], embed_tokens={"embedding": embedding.astype(
        params["model"]["embed_tokens"]["embedding"].dtype)})
    params["lm_head"] = {"kernel": kernel.astype(params["lm_head"]["kernel"].dtype)}
    return params
