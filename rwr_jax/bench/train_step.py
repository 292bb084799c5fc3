r"""train_step benchmark: one GRPO update, ours vs a PyTorch reference update (BENCHMARKS.md).

    python launch/bench.py train_step

Ours: the jitted `rwr_jax.train.step.train_step` (policy log-probs with entropies,
reference log-probs, "dapo" loss with k3 KL at beta 0.001 and clip 0.2 as in
configs/common.py, gradients, AdamW + global-norm clip 1.0 from `make_optimizer`), with
each prompt run once for its group of completions, the completions' projections and
MLPs on their real tokens only and the LM head on loss tokens only, its backward pass
fused into its forward pass (`rl.head_loss`), as the trainer runs it (`prompt_group`,
`packed_sizes`), and also with a full forward pass per row and the
head on every completion position (the reference's work).
Reference: the same update written plainly in PyTorch on the same `Qwen2ForCausalLM`
(`logits_to_keep` completion logits, logsumexp log-probs, the same clipped ratio and
k3 term, token mean, `loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW` with the
same decay mask), timed at 1 and 2 torch threads, the faster being the reference. Both
start from identical weights (`common.random_qwen2`; the frozen reference model is a
second random init, so k3 != 0) on the same GRPO batch: 2 prompts x 8 completions
(METHOD.md's G) of 64 prompt + 128 completion tokens (random ids, left-padded prompts,
right-padded completions, random advantages); the first update's loss and gradient norm
must agree or the run fails. Also reported: FLOP/s of the per-row update (the same
FLOPs as the reference) against a jitted 2048^2 fp32 matmul measured in the same run
(the faster of XLA:CPU's two dot libraries, as in the rollout roofline).
"""

import contextlib
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rwr_jax.bench import common
from rwr_jax.rl import logprobs as logprobs_lib
from rwr_jax.rl import losses
from rwr_jax.rollout import sampler
from rwr_jax.train import optimizer as optimizer_lib
from rwr_jax.train.step import TrainBatch, TrainState, packed_sizes, train_step

BATCH, PROMPT_LENGTH, COMPLETION_LENGTH = 16, 64, 128
GROUP = 8  # completions per prompt (METHOD.md's G): rows of a group share their prompt
NUM_MICRO_BATCHES, LOGPROB_CHUNK = 1, 512  # configs/common.py: logprob_chunk 512 (> C: one chunk)
LOSS = losses.LossConfig(loss_type="dapo", beta=0.001, epsilon_low=0.2, epsilon_high=0.2)
OPTIMIZER = optimizer_lib.OptimizerConfig()  # release settings: lr 1e-6, wd 0.1 on matrices, clip 1.0
PEAK_SIZE, PEAK_CALLS = 2048, 5
LOSS_RTOL, GRAD_NORM_RTOL = 1e-4, 1e-3
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


@dataclasses.dataclass(kw_only=True)
class Setup:
    """Both sides' models, optimiser states and the batch (host arrays in `rows`)."""

    model: object
    tx: object
    state: TrainState
    ref_params: dict
    batch: TrainBatch
    rows: dict[str, np.ndarray]
    torch_policy: object
    torch_reference: object
    torch_optimizer: object


def trajectories(vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """GRPO rows: BATCH / GROUP prompts with GROUP completions each (consecutive rows).

    Returns tokens / token_mask / positions [B, P + C], loss_mask [B, C], advantages [B]:
    random ids, prompts left-padded to P (one length per group), completions
    right-padded to C (one length per row), random advantages.
    """
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (BATCH, PROMPT_LENGTH + COMPLETION_LENGTH)).astype(np.int32)
    first = np.arange(BATCH) // GROUP * GROUP
    tokens[:, :PROMPT_LENGTH] = tokens[first, :PROMPT_LENGTH]
    prompt = rng.integers(PROMPT_LENGTH // 2, PROMPT_LENGTH + 1, BATCH // GROUP).repeat(GROUP)
    completion = rng.integers(COMPLETION_LENGTH // 2, COMPLETION_LENGTH + 1, BATCH)
    prompt[:GROUP], completion[0] = PROMPT_LENGTH, COMPLETION_LENGTH  # one row without padding
    token_mask = np.concatenate([np.arange(PROMPT_LENGTH)[None] >= PROMPT_LENGTH - prompt[:, None],
                                 np.arange(COMPLETION_LENGTH)[None] < completion[:, None]], axis=1)
    return dict(tokens=tokens, token_mask=token_mask,
                positions=np.maximum(np.cumsum(token_mask, axis=1) - 1, 0).astype(np.int32),
                loss_mask=token_mask[:, PROMPT_LENGTH:], advantages=rng.normal(size=BATCH).astype(np.float32))


def forward_logprobs(model, params, rows: dict) -> jax.Array:
    """[B, C] float32 completion log-probs (forward only; the reference model's part of a step)."""
    return _forward_logprobs(model, params, jnp.asarray(rows["tokens"]), jnp.asarray(rows["positions"]),
                             jnp.asarray(rows["token_mask"]))


@functools.partial(jax.jit, static_argnames="model")
def _forward_logprobs(model, params, tokens, positions, token_mask):
    return logprobs_lib.completion_logprobs(model, params, tokens, positions, token_mask,
                                            prompt_length=PROMPT_LENGTH, chunk_size=LOGPROB_CHUNK)


def build_setup(shape: str) -> Setup:
    """Policy (seed 0) and frozen reference (seed 1) on both sides, the batch, both optimisers."""
    import torch  # pylint: disable=g-import-not-at-top

    from rwr_jax.models.qwen2_vl import convert  # pylint: disable=g-import-not-at-top
    torch_policy, config, params = common.random_qwen2(shape, seed=0)
    torch_reference, _, ref_params = common.random_qwen2(shape, seed=1)
    torch_reference.requires_grad_(False)
    model = convert.build_model(config)
    rows = trajectories(config.vocab_size)
    # Sampler log-probs (only the mismatch diagnostic reads them): the policy's, plus noise.
    noise = np.random.default_rng(2).normal(0.0, 0.01, (BATCH, COMPLETION_LENGTH)).astype(np.float32)
    sampler = forward_logprobs(model, params, rows) + noise
    batch = TrainBatch(**{k: jnp.asarray(rows[k]) for k in ("tokens", "token_mask", "positions", "loss_mask",
                                                              "advantages")}, sampler_logprobs=sampler)
    tx = optimizer_lib.make_optimizer(OPTIMIZER, params)
    decay = [p for p in torch_policy.parameters() if p.ndim >= 2]
    no_decay = [p for p in torch_policy.parameters() if p.ndim < 2]
    torch_optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": OPTIMIZER.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=OPTIMIZER.learning_rate, betas=(OPTIMIZER.b1, OPTIMIZER.b2), eps=OPTIMIZER.eps)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    return Setup(model=model, tx=tx, state=state, ref_params=ref_params, batch=batch, rows=rows,
                 torch_policy=torch_policy.train(), torch_reference=torch_reference, torch_optimizer=torch_optimizer)


def ours_update(s: Setup, clock: common.Phases, as_trainer: bool = True) -> dict[str, float]:
    """One `train_step` (the state is donated and replaced); returns loss, grad_norm, kl.

    as_trainer: each prompt runs once for its group, the completions padding-free and the
    LM head on loss tokens only, as the trainer runs it; False: a full forward pass per
    row and the head on every completion position, as the reference does.
    """
    work = dict(prompt_group=GROUP, **packed_sizes(s.rows["loss_mask"], s.rows["token_mask"], NUM_MICRO_BATCHES,
                                                   LOGPROB_CHUNK)) if as_trainer else {}
    s.state, metrics = train_step(s.model, s.tx, s.state, s.batch, s.ref_params, loss_config=LOSS,
                                  num_micro_batches=NUM_MICRO_BATCHES, chunk_size=LOGPROB_CHUNK,
                                  prompt_length=PROMPT_LENGTH, **work)
    out = {name: float(metrics[name]) for name in ("loss", "grad_norm", "kl")}
    clock.mark("update")
    return out


def _torch_logprobs(model, inputs: dict):
    """[B, C] log p(completion) from the last C + 1 positions' logits (TRL's `logits_to_keep`)."""
    import torch  # pylint: disable=g-import-not-at-top
    logits = model(**inputs, use_cache=False, logits_to_keep=COMPLETION_LENGTH + 1).logits[:, :-1].float()
    targets = inputs["input_ids"][:, PROMPT_LENGTH:]
    return logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)


def _torch_loss(logp, ref_logp, mask, advantages):
    """The dapo GRPO loss (token mean) and the mean k3, as `rwr_jax.rl.losses` defines them."""
    import torch  # pylint: disable=g-import-not-at-top
    clamp = LOSS.log_ratio_clamp
    ratio = torch.exp(torch.where(mask, logp - logp.detach(), 0.0).clamp(-clamp, clamp))
    adv = advantages[:, None]
    clipped = ratio.clamp(1.0 - LOSS.epsilon_low, 1.0 + LOSS.epsilon_high)
    d = torch.where(mask, ref_logp - logp, 0.0).clamp(-clamp, clamp)
    k3 = torch.exp(d) - d - 1.0
    per_token = -torch.minimum(ratio * adv, clipped * adv) + LOSS.beta * k3
    count = mask.sum()
    return (per_token * mask).sum() / count, (k3.detach() * mask).sum() / count


def torch_update(s: Setup, clock: common.Phases, threads: int) -> dict[str, float]:
    """The PyTorch reference update on `threads` threads; returns loss, grad_norm, kl."""
    import torch  # pylint: disable=g-import-not-at-top
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = {"input_ids": torch.from_numpy(s.rows["tokens"].astype(np.int64)),
                  "attention_mask": torch.from_numpy(s.rows["token_mask"].astype(np.int64)),
                  "position_ids": torch.from_numpy(s.rows["positions"].astype(np.int64))}
        mask, advantages = torch.from_numpy(s.rows["loss_mask"]), torch.from_numpy(s.rows["advantages"])
        logp = _torch_logprobs(s.torch_policy, inputs)
        clock.mark("policy_forward")
        with torch.no_grad():
            ref_logp = _torch_logprobs(s.torch_reference, inputs)
        clock.mark("reference_forward")
        loss, kl = _torch_loss(logp, ref_logp, mask, advantages)
        s.torch_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clock.mark("backward")
        grad_norm = torch.nn.utils.clip_grad_norm_(s.torch_policy.parameters(), OPTIMIZER.max_grad_norm)
        s.torch_optimizer.step()
        clock.mark("clip_adamw")
    finally:
        torch.set_num_threads(previous)
    return {"loss": loss.item(), "grad_norm": grad_norm.item(), "kl": kl.item()}


@contextlib.contextmanager
def compile_seconds():
    """Yields a one-item list holding the seconds JAX spends tracing, lowering and compiling in the block."""
    total = [0.0]

    def listener(event: str, duration_secs: float, **kwargs):
        del kwargs
        if event in COMPILE_EVENTS:
            total[0] += duration_secs

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield total
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


MATMULS = {"ynnpack": jax.jit(jnp.matmul), "eigen": jax.jit(jnp.matmul, compiler_options=sampler.EIGEN_DOT_OPTIONS)}


def matmul_probe(x: jax.Array, clock: common.Phases, library: str) -> jax.Array:
    """PEAK_CALLS jitted fp32 [PEAK_SIZE, PEAK_SIZE] matmuls of `x` with itself with one of XLA:CPU's dot
    libraries (`MATMULS`; other backends ignore the choice): the peak probe."""
    for _ in range(PEAK_CALLS):
        out = MATMULS[library](x, x)
    clock.mark("matmul")
    return out.block_until_ready()


def update_flops(config, params) -> tuple[float, str]:
    """Model FLOPs of one update (no remat), and the formula."""
    tokens, head_positions = BATCH * (PROMPT_LENGTH + COMPLETION_LENGTH), BATCH * COMPLETION_LENGTH
    head, embed = params["lm_head"]["kernel"].size, params["model"]["embed_tokens"]["embedding"].size
    layers = sum(x.size for x in jax.tree_util.tree_leaves(params)) - head - embed
    attention = config.num_layers * config.hidden_size * (PROMPT_LENGTH + COMPLETION_LENGTH) * tokens
    flops = 8 * layers * tokens + 8 * head * head_positions + 16 * attention
    return flops, (f"FLOPs/update = policy 6(N_L*T + N_head*T_C) + 12*L*D*S*T + reference forward "
                   f"2(N_L*T + N_head*T_C) + 4*L*D*S*T, N_L {layers / 1e6:.2f}M non-embedding non-head params, "
                   f"N_head {head / 1e6:.2f}M, T {tokens}, T_C {head_positions} LM-head positions, S "
                   f"{PROMPT_LENGTH + COMPLETION_LENGTH} (attention counted as full SxS): {flops / 1e9:.1f} GFLOP")


def check_first_update(ours: dict[str, float], reference: dict[str, float]) -> str:
    """Raises RuntimeError unless the first updates' loss and grad norm agree; describes the agreement."""
    errors = {name: abs(ours[name] - reference[name]) / abs(reference[name]) for name in ("loss", "grad_norm")}
    description = "first update: " + ", ".join(
        f"{name} ours {ours[name]:.6g} torch {reference[name]:.6g} (rel {errors[name]:.1e})" for name in errors)
    description += f", kl ours {ours['kl']:.3g} torch {reference['kl']:.3g}"
    if errors["loss"] > LOSS_RTOL or errors["grad_norm"] > GRAD_NORM_RTOL:
        raise RuntimeError(f"ours and the torch reference disagree (tolerances loss {LOSS_RTOL}, grad norm "
                           f"{GRAD_NORM_RTOL}): {description}")
    return description


def bench_train_step(shape: str, repeats: int = 3, report: Callable[[str], None] = common.emit,
                     torch_threads: tuple[int, ...] = (1, 2)) -> list[str]:
    """Ours vs the PyTorch reference update: tokens/s, fraction of matmul peak, breakdown.

    Args:
      shape: "tiny" or "small".
      repeats: timed repeats (median reported), >= 3 by protocol.
      report: where each result line goes (lines are also returned).
      torch_threads: torch thread counts tried; the fastest is the reference.

    Returns:
      The lines reported: breakdown first, then the summary lines.
    """
    s = build_setup(shape)
    first_clock = common.Phases(sync=False)
    with compile_seconds() as compile_time:
        ours_first = ours_update(s, first_clock)
    check = check_first_update(ours_first, torch_update(s, common.Phases(sync=False), torch_threads[0]))
    square = jnp.ones((PEAK_SIZE, PEAK_SIZE), jnp.float32)
    runs = {"ours": lambda c: ours_update(s, c),
            "ours_per_row": lambda c: ours_update(s, c, as_trainer=False),
            **{f"torch_{n}t": (lambda c, n=n: torch_update(s, c, n)) for n in torch_threads},
            "ours_reference_forward": lambda c: forward_logprobs(s.model, s.ref_params, s.rows).block_until_ready(),
            **{f"peak_{name}": (lambda c, name=name: matmul_probe(square, c, name)) for name in MATMULS}}
    _, median, phases = common.time_interleaved(runs, repeats)
    torch_best = min((f"torch_{n}t" for n in torch_threads), key=median.get)
    lines = [
        f"train_step_breakdown [{shape}]: ours update {median['ours'] * 1e3:.1f} ms (as the trainer runs it), "
        f"{median['ours_per_row'] * 1e3:.1f} ms (a full forward per row, head on every position); ours forward-only "
        f"log-probs, a full forward per row (the reference model's share of the per-row update) "
        f"{median['ours_reference_forward'] * 1e3:.1f} ms | "
        f"{torch_best}: " + " | ".join(f"{p} {t * 1e3:.1f} ms" for p, t in phases[torch_best].items()),
        *_summaries(shape, s, median, torch_best, (first_clock.seconds["update"], compile_time[0]), check, repeats),
    ]
    for line in lines:
        report(line)
    return lines


def _summaries(shape: str, s: Setup, median: dict[str, float], torch_best: str, first_call: tuple[float, float],
               check: str, repeats: int) -> list[str]:
    """The tokens/s and the fraction-of-peak summary lines; first_call = (its seconds, compile seconds in it)."""
    tokens = BATCH * (PROMPT_LENGTH + COMPLETION_LENGTH)
    sizes = packed_sizes(s.rows["loss_mask"], s.rows["token_mask"], NUM_MICRO_BATCHES, LOGPROB_CHUNK)
    flops, formula = update_flops(s.model.config, s.state.params)
    peak = PEAK_CALLS * 2 * PEAK_SIZE ** 3 / min(median[f"peak_{name}"] for name in MATMULS) / 1e9
    others = "; ".join(f"{name} {tokens / seconds:.1f} tokens/s" for name, seconds in median.items()
                       if name.startswith("torch"))
    return [
        common.summary(
            "train_step", shape, tokens / median["ours"], f"torch_update({torch_best})", tokens / median[torch_best],
            "tokens/s",
            f"tokens = batch {BATCH} x (prompt {PROMPT_LENGTH} + completion {COMPLETION_LENGTH}) per update, padding "
            f"included ({int(s.rows['token_mask'].sum())} real, {int(s.rows['loss_mask'].sum())} loss tokens); "
            f"{LOSS.loss_type} beta {LOSS.beta} k3, AdamW + clip {OPTIMIZER.max_grad_norm}, fp32, micro-batches "
            f"{NUM_MICRO_BATCHES}, log-prob chunk {LOGPROB_CHUNK}, ours on XLA's default CPU pool; median of "
            f"{repeats}; ours runs each prompt once for its {GROUP} completions, the completions padding-free "
            f"and the LM head on loss tokens only, fused with its backward pass ({sizes}); with a full forward "
            f"per row and the head on every "
            f"position {tokens / median['ours_per_row']:.1f} tokens/s = "
            f"{median[torch_best] / median['ours_per_row']:.2f}x; "
            f"ours first call {first_call[0]:.2f} s, of which trace + lower + XLA compile "
            f"{first_call[1]:.2f} s, vs median {median['ours']:.3f} s; all torch: {others}; {check}"),
        common.summary(
            "train_step_peak_fraction", shape, flops / median["ours_per_row"] / 1e9,
            f"jitted_{PEAK_SIZE}x{PEAK_SIZE}_fp32_matmul", peak, "GFLOP/s",
            f"ratio = fraction of measured matmul peak of ours with a full forward per row (the reference's "
            f"FLOPs); {torch_best} {flops / median[torch_best] / 1e9:.1f} GFLOP/s = "
            f"{flops / median[torch_best] / 1e9 / peak:.2f} of peak; {formula}"),
    ]
