"""GRPO learns: on a tiny model and a verifiable reward, the mean reward rises clearly.

The task: write lowercase letters. The reward of a completion is the share of its
model-written tokens that are one of the 26 letters `a`-`z` (of 314 tokens in the tiny
vocabulary; about 5 % of the initial policy's tokens). Each step
runs the real pipeline: `engine.rollout` (temperature 1, G = 8 per prompt), the
registered "grpo" advantage estimator and `scoring.make_train_batch` (loss mask from the
trajectory), then the jitted `train_step` (GRPO loss with the k3 KL term, two
micro-batches) with the real AdamW + warm-up/cosine optimiser.

What a broken wire would do: a flipped advantage sign makes the reward fall (the control
runs with the reward negated and shows that it does); train-side log-probs that are not
those of the sampled, loss-masked tokens show up as `logprob_mismatch` (asserted ~0); an
optimiser that does not apply the gradient leaves the reward flat.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwr_jax.rl import advantages as advantages_lib, losses
from rwr_jax.rollout import engine, stop_strings
from rwr_jax.train import optimizer as optimizer_lib, scoring
from rwr_jax.train.step import TrainState, train_step
from tests.rollout import tiny_lm

# A tiny random model and 16 steps: a learning rate far above a real run's 1e-6.
STEPS, G, LEARNING_RATE = 16, 8, 1e-1
PROMPTS = ("Write:", "Letter")


def _task():
    """(model, params, prompts, stop tables, [V] bool mask of the rewarded tokens)."""
    tokenizer = tiny_lm.tokenizer()
    model, params = tiny_lm.model_and_params(seed=0)
    tokens = np.asarray([[tiny_lm.token_id(c) for c in prompt] for prompt in PROMPTS], np.int32)
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape).copy()
    prompts = engine.PromptBatch(tokens=tokens, token_mask=np.ones_like(tokens, bool), positions=positions)
    vocab = model.config.vocab_size
    tables = stop_strings.build_stop_tables(stop_strings.token_bytes_of(tokenizer, vocab), ("</query>", "</answer>"))
    rewarded = np.zeros(vocab, bool)
    rewarded[[tiny_lm.token_id(chr(c)) for c in range(ord("a"), ord("z") + 1)]] = True
    return model, params, prompts, tables, rewarded


def _train(reward_sign: float, optimizer, task) -> tuple[list[float], list[float]]:
    """STEPS GRPO steps; returns the mean reward of each step's rollouts (before its
    update) and each step's logprob_mismatch metric."""
    model, params, prompts, tables, rewarded = task
    rollout_config = engine.RolloutConfig(max_rounds=1, max_new_tokens_per_round=8, max_completion_length=8,
                                          group_size=G)
    advantage_config = advantages_lib.AdvantageConfig(estimator="grpo", group_size=G)
    loss_config = losses.LossConfig(loss_type="grpo", beta=0.001)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree_util.tree_map(jnp.copy, params),
                       opt_state=optimizer.init(params))
    mean_rewards, mismatches = [], []
    for step in range(STEPS):
        traj = engine.rollout(model, state.params, prompts, tiny_lm.tokenizer(), lambda q: [[] for _ in q],
                              rollout_config, jax.random.key(step), stop_tables=tables,
                              eos_ids=(tiny_lm.token_id(tiny_lm.EOS),))
        written = traj.loss_mask
        reward = (rewarded[traj.tokens] & written).sum(axis=1) / np.maximum(written.sum(axis=1), 1)
        mean_rewards.append(float(reward.mean()))
        batch = scoring.make_train_batch(traj, jnp.asarray(reward_sign * reward, jnp.float32), advantage_config)
        state, metrics = train_step(model, optimizer, state, batch, params, loss_config=loss_config,
                                    num_micro_batches=2, chunk_size=16, prompt_length=prompts.tokens.shape[1])
        mismatches.append(float(metrics["logprob_mismatch"]))
    return mean_rewards, mismatches


@pytest.mark.slow
def test_mean_reward_rises_and_falls_with_the_advantage_sign():
    """Mean reward of steps 1-3 vs 14-16, measured (fixed seeds, CPU, deterministic):
    rewarded 0.072 -> 1.000 (0.032 0.086 0.098 0.167 0.172 0.320 0.430 0.742 0.914 ...);
    negated-reward control 0.050 -> 0.000. Compilation dominates the run time (42-77 s
    on 2 busy CPU cores); the control reuses the compiled rollout and step."""
    task = _task()
    optimizer = optimizer_lib.make_optimizer(
        optimizer_lib.OptimizerConfig(learning_rate=LEARNING_RATE, total_steps=STEPS), task[1])
    rewarded, mismatch = _train(+1.0, optimizer, task)
    control, _ = _train(-1.0, optimizer, task)
    print("rewarded:", " ".join(f"{r:.3f}" for r in rewarded))
    print("negated: ", " ".join(f"{r:.3f}" for r in control))
    print("logprob mismatch:", max(mismatch))
    first, last = np.mean(rewarded[:3]), np.mean(rewarded[-3:])
    # The trainer scores exactly the tokens the sampler drew, under the sampler's log-probs.
    assert max(mismatch) < 1e-4
    assert first < 0.15 and last > 0.8, (first, last)
    assert np.mean(control[-3:]) < 0.5 * np.mean(control[:3]), control
