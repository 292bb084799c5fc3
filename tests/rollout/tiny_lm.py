"""A tiny byte-level BPE tokenizer whose Med-RwR tags are single tokens, and a tiny
random decoder biased toward those tags, so random rollouts pause, retrieve and answer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from rwr_jax.models.qwen2_vl.config import DecoderConfig
from rwr_jax.models.qwen2_vl.decoder import DecoderLM

TAGS = ("<think>", "</think>", "<query>", "</query>", "<answer>", "</answer>", "<retrieve>", "</retrieve>")
EOS = "<|im_end|>"
# Per-step logit bonus of selected tokens (others 0): tags show up every few dozen steps.
BIAS = {"<query>": 3.0, "</query>": 3.0, "</answer>": 1.5, EOS: 0.5, "<think>": 1.0, "<answer>": 1.0}


@functools.cache
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    merges = []
    for tag in TAGS:
        chars = [byte_chars[b] for b in tag.encode()]
        current = chars[0]
        for c in chars[1:]:
            merges.append((current, c))
            current += c
            vocab.setdefault(current, len(vocab))
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS)


def token_id(text: str) -> int:
    return tokenizer().convert_tokens_to_ids(text if text == EOS else "".join(
        bytes_to_unicode()[b] for b in text.encode()))


def model_and_params(seed: int = 0, mrope: bool = False):
    """A 2-layer random decoder over the tiny vocabulary, with a constant residual
    feature that turns one lm_head row into a per-token logit bias."""
    vocab = len(tokenizer())
    config = DecoderConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                           num_kv_heads=2, mrope_section=(2, 1, 1) if mrope else None)
    model = DecoderLM(config)
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(seed), tokens, tokens, tokens >= 0)["params"]
    params = jax.tree_util.tree_map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                                    is_leaf=lambda x: hasattr(x, "unbox"))
    embedding = np.array(params["model"]["embed_tokens"]["embedding"])
    embedding[:, 0] = 20.0  # dominates the final RMSNorm: normed h[0] ~ sqrt(D)
    kernel = np.array(params["lm_head"]["kernel"])
    kernel[0] = 0.0
    for text, bonus in BIAS.items():
        kernel[0, token_id(text)] = bonus / np.sqrt(config.hidden_size)
    params["model"]["embed_tokens"]["embedding"] = jnp.asarray(embedding)
    params["lm_head"]["kernel"] = jnp.asarray(kernel)
    return model, params
