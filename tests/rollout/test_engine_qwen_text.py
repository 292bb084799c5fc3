"""Rollouts of scripted Qwen text through the real engine and the real Qwen tokenizer.

A scripted model puts (almost) all probability on one token per text position, so a
rollout writes a chosen completion exactly as Qwen's tokenizer splits it, e.g.
`</query><retrieve>` as ' </', 'query', '><', 'retrieve', '>'.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwr_jax.data import chat_template, tokenizer as tokenizer_lib
from rwr_jax.models.qwen2_vl.config import DecoderConfig
from rwr_jax.rl import parser, rewards
from rwr_jax.rollout import engine, sampler, stop_strings
from rwr_jax.rollout.trajectory import Passage

PEAK = 50.0  # the scripted token's logit; every other token's is 0


class ScriptedLM:
    """Logits at text position p: PEAK on script[p + 1], 0 elsewhere (the model API the
    engine uses: apply(..., return_hidden=True) and apply(..., method=logits))."""

    def __init__(self, script: np.ndarray, vocab_size: int):
        self.config = DecoderConfig(vocab_size=vocab_size, hidden_size=8, intermediate_size=8, num_layers=1,
                                    num_heads=1, num_kv_heads=1, mrope_section=None)
        self.script = jnp.asarray(script, jnp.int32)

    def logits(self, hidden):
        position = hidden[..., 0].astype(jnp.int32)
        upcoming = self.script[jnp.clip(position + 1, 0, self.script.shape[0] - 1)]
        return jnp.where(jnp.arange(self.config.vocab_size) == upcoming[..., None], PEAK, 0.0)

    def apply(self, variables, inputs, positions=None, mask=None, cache=None, return_hidden=False, method=None,
              **kwargs):
        del variables, mask, kwargs
        if method is not None:
            return method(self, inputs)
        hidden = positions[..., None].astype(jnp.float32)  # the "hidden state" is the text position
        return (hidden if return_hidden else self.logits(hidden)), cache


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_lib.load_tokenizer()


def _roll(tokenizer, completion: str):
    """Rolls out `completion` (a retrieved block follows each `</query>`) for one prompt."""
    vocab = len(tokenizer)
    prompt = chat_template.encode_prompt(tokenizer, "Which organism?", system_prompt="S")
    passages = [Passage("1", "alpha"), Passage("2", "beta")]
    block = tokenizer.encode(engine.format_retrieved(passages), add_special_tokens=False)
    script = list(prompt)
    for i, part in enumerate(completion.split("{block}")):
        script += (block if i else []) + tokenizer.encode(part, add_special_tokens=False)
    script = np.asarray(script + [tokenizer_lib.IM_END_ID] * 8, np.int32)
    model = ScriptedLM(script, vocab)
    prompts = engine.PromptBatch(tokens=prompt[None], token_mask=np.ones((1, len(prompt)), bool),
                                 positions=np.arange(len(prompt), dtype=np.int32)[None])
    config = engine.RolloutConfig(max_rounds=3, max_new_tokens_per_round=64, max_completion_length=256,
                                  group_size=1, extend_bucket=16)
    searched = []

    def retrieve(queries):
        searched.extend(queries)
        return [passages for _ in queries]

    tables = stop_strings.build_stop_tables(stop_strings.token_bytes_of(tokenizer, vocab), ("</query>", "</answer>"))
    traj = engine.rollout(model, {}, prompts, tokenizer, retrieve, config, jax.random.key(0), stop_tables=tables,
                          eos_ids=tokenizer_lib.EOS_IDS, max_retrieved_tokens=64)
    return traj, searched


@pytest.mark.parametrize("after", ["<", "\n", "\n\n"])
def test_text_after_the_query_tag_in_its_last_token_is_cut(tokenizer, after):
    """The release's `...</query><retrieve>` makes Qwen sample '><' as the tag's last
    token: the round still ends at `</query>` (the '<' would be a stray character before
    the block and cost the whole format reward)."""
    written = (f"<think> Search. </think><query> causes of chest pain </query>{after}{{block}}"
               "<think> Pneumonia. </think><answer> B. Pneumonia </answer>")
    traj, searched = _roll(tokenizer, written)
    text = tokenizer.decode(traj.tokens[0, :traj.length[0]].tolist(), skip_special_tokens=False)
    assert searched == ["causes of chest pain"]
    assert "</query><retrieve> (1) alpha\n(2) beta\n </retrieve><think> Pneumonia." in text, text
    close = tokenizer.encode(">", add_special_tokens=False)[0]
    at = int(np.flatnonzero(traj.source[0] == sampler.SOURCE_ENV)[0]) - 1  # the tag's last token
    assert traj.tokens[0, at] == close and traj.source[0, at] == sampler.SOURCE_MODEL
    # Its log-prob under the logits it was sampled from: PEAK went to the cut token.
    expected = -np.log(np.exp(PEAK) + len(tokenizer) - 1)
    np.testing.assert_allclose(traj.logprobs[0, at], expected, rtol=1e-6)
    tables = parser.build_text_tables(tokenizer, len(tokenizer))
    parsed = parser.parse_batch(traj, ["B. Pneumonia"], tables, options=[{"A": "Asthma", "B": "Pneumonia"}])
    assert float(rewards.format_reward(parsed)[0]) == 3.0
