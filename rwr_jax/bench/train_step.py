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
right-padded completions, random advantages; shape 0.5b: 128 + 512); the first update's
loss and gradient norm must agree or the run fails. Also reported: FLOP/s of the
per-row update (the same FLOPs as the reference) against a jitted square matmul in the
compute dtype, accumulated in float32, measured in the same run (2048^2 on a CPU, the
faster of XLA:CPU's two dot libraries as in the rollout roofline; 8192^2 on a GPU, where
the fraction is the MFU).

On a GPU (JAX's default backend) the reference runs on CUDA and both sides multiply
float32 at full precision (no TF32). `--dtype=bfloat16` computes in bfloat16 with
float32 parameters on both sides (ours: the model's `dtype`; the reference:
`torch.autocast`), as the checkpoint configs train (on a CPU with AMX both sides then
run their products on it: ours through `models.cpu_dots`); `--attention_kernel=cudnn`
gives ours cuDNN flash attention (bfloat16 on NVIDIA GPUs).

    python launch/bench.py train_step --shapes=small,0.5b --dtype=bfloat16 --attention_kernel=cudnn   # on a GPU
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

GROUP = 8  # completions per prompt (METHOD.md's G): rows of a group share their prompt
NUM_MICRO_BATCHES, LOGPROB_CHUNK = 1, 512  # configs/common.py: logprob_chunk 512 (> C: one chunk)
LOSS = losses.LossConfig(loss_type="dapo", beta=0.001, epsilon_low=0.2, epsilon_high=0.2)
OPTIMIZER = optimizer_lib.OptimizerConfig()  # release settings: lr 1e-6, wd 0.1 on matrices, clip 1.0
PEAK_SIZES, PEAK_CALLS = {"cpu": 2048, "gpu": 8192}, 5  # square matmul of the peak probe, per backend
# First-update agreement (relative): float32 on both sides, or bfloat16 compute (other roundings).
TOLERANCES = {"float32": dict(loss=1e-4, grad_norm=1e-3), "bfloat16": dict(loss=1e-2, grad_norm=3e-2)}
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


@dataclasses.dataclass(frozen=True)
class Workload:
    """The GRPO batch of one update: `batch` rows of `prompt` + `completion` token ids."""

    batch: int = 16
    prompt: int = 64
    completion: int = 128

    @property
    def tokens(self) -> int:
        return self.batch * (self.prompt + self.completion)


WORKLOADS = {"tiny": Workload(), "small": Workload(), "0.5b": Workload(prompt=128, completion=512)}


@dataclasses.dataclass(kw_only=True)
class Setup:
    """Both sides' models, optimiser states and the batch (host arrays in `rows`)."""

    work: Workload
    dtype: str
    model: object
    tx: object
    state: TrainState
    ref_params: dict
    batch: TrainBatch
    rows: dict[str, np.ndarray]
    torch_policy: object
    torch_reference: object
    torch_optimizer: object


def trajectories(vocab_size: int, seed: int = 0, work: Workload = Workload()) -> dict[str, np.ndarray]:
    """GRPO rows: B / GROUP prompts with GROUP completions each (consecutive rows).

    Returns tokens / token_mask / positions [B, P + C], loss_mask [B, C], advantages [B]:
    random ids, prompts left-padded to P (one length per group), completions
    right-padded to C (one length per row), random advantages.
    """
    rng = np.random.default_rng(seed)
    batch, prompt_length, completion_length = work.batch, work.prompt, work.completion
    tokens = rng.integers(0, vocab_size, (batch, prompt_length + completion_length)).astype(np.int32)
    first = np.arange(batch) // GROUP * GROUP
    tokens[:, :prompt_length] = tokens[first, :prompt_length]
    prompt = rng.integers(prompt_length // 2, prompt_length + 1, batch // GROUP).repeat(GROUP)
    completion = rng.integers(completion_length // 2, completion_length + 1, batch)
    prompt[:GROUP], completion[0] = prompt_length, completion_length  # one row without padding
    token_mask = np.concatenate([np.arange(prompt_length)[None] >= prompt_length - prompt[:, None],
                                 np.arange(completion_length)[None] < completion[:, None]], axis=1)
    return dict(tokens=tokens, token_mask=token_mask,
                positions=np.maximum(np.cumsum(token_mask, axis=1) - 1, 0).astype(np.int32),
                loss_mask=token_mask[:, prompt_length:], advantages=rng.normal(size=batch).astype(np.float32))


def forward_logprobs(model, params, rows: dict) -> jax.Array:
    """[B, C] float32 completion log-probs (forward only; the reference model's part of a step)."""
    return _forward_logprobs(model, params, jnp.asarray(rows["tokens"]), jnp.asarray(rows["positions"]),
                             jnp.asarray(rows["token_mask"]), prompt_length=rows["token_mask"].shape[1] -
                             rows["loss_mask"].shape[1])


@functools.partial(jax.jit, static_argnames=("model", "prompt_length"))
def _forward_logprobs(model, params, tokens, positions, token_mask, prompt_length):
    return logprobs_lib.completion_logprobs(model, params, tokens, positions, token_mask,
                                            prompt_length=prompt_length, chunk_size=LOGPROB_CHUNK)


def build_setup(shape: str, dtype: str = "float32", attention_kernel: str = "xla") -> Setup:
    """Policy (seed 0) and frozen reference (seed 1) on both sides, the batch, both optimisers.

    dtype: compute dtype ("float32" or "bfloat16"; parameters stay float32);
    attention_kernel: ours (the "attention" registry).
    """
    import torch  # pylint: disable=g-import-not-at-top

    from rwr_jax.models.qwen2_vl import convert  # pylint: disable=g-import-not-at-top
    numerics = dict(dtype=dtype, param_dtype="float32", attention_kernel=attention_kernel)
    torch_policy, config, params = common.random_qwen2(shape, seed=0, **numerics)
    torch_reference, _, ref_params = common.random_qwen2(shape, seed=1, **numerics)
    torch_reference.requires_grad_(False)
    model = convert.build_model(config)
    work = WORKLOADS[shape]
    rows = trajectories(config.vocab_size, work=work)
    # Sampler log-probs (only the mismatch diagnostic reads them): the policy's, plus noise.
    noise = np.random.default_rng(2).normal(0.0, 0.01, (work.batch, work.completion)).astype(np.float32)
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
    return Setup(work=work, dtype=dtype, model=model, tx=tx, state=state, ref_params=ref_params, batch=batch, rows=rows,
                 torch_policy=torch_policy.train(), torch_reference=torch_reference, torch_optimizer=torch_optimizer)


def ours_update(s: Setup, clock: common.Phases, as_trainer: bool = True) -> dict[str, float]:
    """One `train_step` (the state is donated and replaced); returns loss, grad_norm, kl.

    as_trainer: each prompt runs once for its group, the completions padding-free and the
    LM head on loss tokens only, as the trainer runs it; False: a full forward pass per
    row and the head on every completion position, as the reference does.
    """
    packing = dict(prompt_group=GROUP, **packed_sizes(s.rows["loss_mask"], s.rows["token_mask"], NUM_MICRO_BATCHES,
                                                      LOGPROB_CHUNK)) if as_trainer else {}
    s.state, metrics = train_step(s.model, s.tx, s.state, s.batch, s.ref_params, loss_config=LOSS,
                                  num_micro_batches=NUM_MICRO_BATCHES, chunk_size=LOGPROB_CHUNK,
                                  prompt_length=s.work.prompt, **packing)
    out = {name: float(metrics[name]) for name in ("loss", "grad_norm", "kl")}
    clock.mark("update")
    return out


def _torch_logprobs(model, inputs: dict, completion_length: int, dtype: str):
    """[B, C] log p(completion) from the last C + 1 positions' logits (TRL's `logits_to_keep`), the
    model run in `dtype` (bfloat16: `torch.autocast`, parameters float32)."""
    import torch  # pylint: disable=g-import-not-at-top
    device = inputs["input_ids"].device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        logits = model(**inputs, use_cache=False, logits_to_keep=completion_length + 1).logits
    logits = logits[:, :-1].float()
    targets = inputs["input_ids"][:, -completion_length:]
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


def _torch_attention_mask(token_mask: np.ndarray) -> np.ndarray:
    """[B, 1, T, T] bool (True: attend) from token_mask [B, T]: causal over real keys, and each position
    also sees itself, so no query row (a left-padding position) is fully masked. Real positions attend as
    with the [B, T] mask; torch's CUDA attention backward in bfloat16 gives NaN on fully masked rows."""
    length = token_mask.shape[1]
    causal_real_keys = np.tri(length, dtype=bool)[None] & token_mask[:, None, :].astype(bool)
    return (causal_real_keys | np.eye(length, dtype=bool))[:, None]


def torch_update(s: Setup, clock: common.Phases, threads: int) -> dict[str, float]:
    """The PyTorch reference update on `threads` CPU threads (on CUDA, where the model is, the
    threads only drive it); returns loss, grad_norm, kl. Each phase mark waits for CUDA."""
    import torch  # pylint: disable=g-import-not-at-top
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    device = next(s.torch_policy.parameters()).device
    to_torch = lambda name, dtype: torch.from_numpy(s.rows[name].astype(dtype)).to(device)  # noqa: E731
    mark = lambda phase: (common.torch_sync(), clock.mark(phase))  # noqa: E731
    try:
        inputs = {"input_ids": to_torch("tokens", np.int64), "position_ids": to_torch("positions", np.int64),
                  "attention_mask": torch.from_numpy(_torch_attention_mask(s.rows["token_mask"])).to(device)}
        mask, advantages = to_torch("loss_mask", bool), to_torch("advantages", np.float32)
        logp = _torch_logprobs(s.torch_policy, inputs, s.work.completion, s.dtype)
        mark("policy_forward")
        with torch.no_grad():
            ref_logp = _torch_logprobs(s.torch_reference, inputs, s.work.completion, s.dtype)
        mark("reference_forward")
        loss, kl = _torch_loss(logp, ref_logp, mask, advantages)
        s.torch_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mark("backward")
        grad_norm = torch.nn.utils.clip_grad_norm_(s.torch_policy.parameters(), OPTIMIZER.max_grad_norm)
        s.torch_optimizer.step()
        mark("clip_adamw")
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


# The peak probe's dot libraries: XLA:CPU's two (other backends ignore the choice and run one). The product
# accumulates and returns float32: in bfloat16, the form of the model's products (XLA:CPU runs only it on AMX).
_PEAK_MATMUL = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)
MATMULS = {"ynnpack": jax.jit(_PEAK_MATMUL),
           "eigen": jax.jit(_PEAK_MATMUL, compiler_options=sampler.EIGEN_DOT_OPTIONS)}


def matmul_probe(x: jax.Array, clock: common.Phases, matmul: Callable) -> jax.Array:
    """PEAK_CALLS jitted square matmuls of `x` with itself by `matmul` (of `MATMULS`): the peak probe."""
    for _ in range(PEAK_CALLS):
        out = matmul(x, x)
    clock.mark("matmul")
    return out.block_until_ready()


def update_flops(config, params, work: Workload) -> tuple[float, str]:
    """Model FLOPs of one update (no remat), and the formula."""
    tokens, head_positions, length = work.tokens, work.batch * work.completion, work.prompt + work.completion
    head, embed = params["lm_head"]["kernel"].size, params["model"]["embed_tokens"]["embedding"].size
    layers = sum(x.size for x in jax.tree_util.tree_leaves(params)) - head - embed
    attention = config.num_layers * config.hidden_size * length * tokens
    flops = 8 * layers * tokens + 8 * head * head_positions + 16 * attention
    return flops, (f"FLOPs/update = policy 6(N_L*T + N_head*T_C) + 12*L*D*S*T + reference forward "
                   f"2(N_L*T + N_head*T_C) + 4*L*D*S*T, N_L {layers / 1e6:.2f}M non-embedding non-head params, "
                   f"N_head {head / 1e6:.2f}M, T {tokens}, T_C {head_positions} LM-head positions, S "
                   f"{length} (attention counted as full SxS): {flops / 1e9:.1f} GFLOP")


def check_first_update(ours: dict[str, float], reference: dict[str, float], dtype: str) -> str:
    """Raises RuntimeError unless the first updates' loss and grad norm agree within `TOLERANCES[dtype]`;
    describes the agreement."""
    errors = {name: abs(ours[name] - reference[name]) / abs(reference[name]) for name in ("loss", "grad_norm")}
    description = "first update: " + ", ".join(
        f"{name} ours {ours[name]:.6g} torch {reference[name]:.6g} (rel {errors[name]:.1e})" for name in errors)
    description += f", kl ours {ours['kl']:.3g} torch {reference['kl']:.3g}"
    if not all(errors[name] <= tolerance for name, tolerance in TOLERANCES[dtype].items()):  # NaN fails
        raise RuntimeError(f"ours and the torch reference disagree (tolerances {TOLERANCES[dtype]}): {description}")
    return description


def bench_train_step(shape: str, repeats: int = 3, report: Callable[[str], None] = common.emit,
                     torch_threads: tuple[int, ...] = (1, 2), dtype: str = "float32",
                     attention_kernel: str = "xla", profile_dir: str = "") -> list[str]:
    """Ours vs the PyTorch reference update: tokens/s, fraction of matmul peak, breakdown.

    Args:
      shape: a key of `common.SHAPES` (its batch: `WORKLOADS`).
      repeats: timed repeats (median reported), >= 3 by protocol.
      report: where each result line goes (lines are also returned).
      torch_threads: torch thread counts tried on a CPU; the fastest is the reference (on
        a GPU the reference is the one CUDA run).
      dtype: compute dtype of both sides, "float32" or "bfloat16" (parameters float32).
      attention_kernel: ours, from the "attention" registry ("cudnn": NVIDIA GPUs, bfloat16).
      profile_dir: if set, one more update of ours (as the trainer runs it), after the timed
        ones, is traced there with `jax.profiler` (xprof / TensorBoard's profile tab).

    Returns:
      The lines reported: breakdown first, then the summary lines.
    """
    backend = jax.default_backend()
    with common.full_precision_on_gpu():
        s = build_setup(shape, dtype, attention_kernel)
        first_clock = common.Phases(sync=False)
        with compile_seconds() as compile_time:
            ours_first = ours_update(s, first_clock)
        references = common.torch_reference_runs("torch", torch_threads)
        check = check_first_update(ours_first, torch_update(s, common.Phases(sync=False), torch_threads[0]), dtype)
        size = PEAK_SIZES.get(backend, PEAK_SIZES["gpu"])
        square = jnp.ones((size, size), jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
        libraries = MATMULS if backend == "cpu" else {"xla": MATMULS["ynnpack"]}
        runs = {"ours": lambda c: ours_update(s, c),
                "ours_per_row": lambda c: ours_update(s, c, as_trainer=False),
                **{name: (lambda c, n=n: torch_update(s, c, n)) for name, n in references.items()},
                "ours_reference_forward": lambda c: forward_logprobs(s.model, s.ref_params, s.rows).block_until_ready(),
                **{f"peak_{name}": (lambda c, f=f: matmul_probe(square, c, f)) for name, f in libraries.items()}}
        _, median, phases = common.time_interleaved(runs, repeats)
        if profile_dir:
            with jax.profiler.trace(profile_dir):
                ours_update(s, common.Phases(sync=False))
    torch_best = min(references, key=median.get)
    peak = PEAK_CALLS * 2 * size ** 3 / min(median[f"peak_{name}"] for name in libraries) / 1e9
    lines = [
        f"train_step_breakdown [{shape}]: ours update {median['ours'] * 1e3:.1f} ms (as the trainer runs it), "
        f"{median['ours_per_row'] * 1e3:.1f} ms (a full forward per row, head on every position); ours forward-only "
        f"log-probs, a full forward per row (the reference model's share of the per-row update) "
        f"{median['ours_reference_forward'] * 1e3:.1f} ms | "
        f"{torch_best}: " + " | ".join(f"{p} {t * 1e3:.1f} ms" for p, t in phases[torch_best].items()),
        *_summaries(shape, s, median, torch_best, (first_clock.seconds["update"], compile_time[0]), check, repeats,
                    (f"jitted_{size}x{size}_{dtype}_matmul", peak), attention_kernel),
    ]
    for line in lines:
        report(line)
    return lines


def _summaries(shape: str, s: Setup, median: dict[str, float], torch_best: str, first_call: tuple[float, float],
               check: str, repeats: int, peak: tuple[str, float], attention_kernel: str) -> list[str]:
    """The tokens/s and the fraction-of-peak summary lines; first_call = (its seconds, compile seconds in it),
    peak = (the probe's name, its GFLOP/s)."""
    work, tokens = s.work, s.work.tokens
    sizes = packed_sizes(s.rows["loss_mask"], s.rows["token_mask"], NUM_MICRO_BATCHES, LOGPROB_CHUNK)
    flops, formula = update_flops(s.model.config, s.state.params, work)
    others = "; ".join(f"{name} {tokens / seconds:.1f} tokens/s" for name, seconds in median.items()
                       if name.startswith("torch"))
    return [
        common.summary(
            "train_step", shape, tokens / median["ours"], f"torch_update({torch_best})", tokens / median[torch_best],
            "tokens/s",
            f"tokens = batch {work.batch} x (prompt {work.prompt} + completion {work.completion}) per update, padding "
            f"included ({int(s.rows['token_mask'].sum())} real, {int(s.rows['loss_mask'].sum())} loss tokens); "
            f"{LOSS.loss_type} beta {LOSS.beta} k3, AdamW + clip {OPTIMIZER.max_grad_norm}, compute {s.dtype} "
            f"(params float32), micro-batches {NUM_MICRO_BATCHES}, log-prob chunk {LOGPROB_CHUNK}, ours on "
            f"{jax.devices()[0].device_kind} with {attention_kernel} attention; median of "
            f"{repeats}; ours runs each prompt once for its {GROUP} completions, the completions padding-free "
            f"and the LM head on loss tokens only, fused with its backward pass ({sizes}); with a full forward "
            f"per row and the head on every "
            f"position {tokens / median['ours_per_row']:.1f} tokens/s = "
            f"{median[torch_best] / median['ours_per_row']:.2f}x; "
            f"ours first call {first_call[0]:.2f} s, of which trace + lower + XLA compile "
            f"{first_call[1]:.2f} s, vs median {median['ours']:.3f} s; all torch: {others}; {check}"),
        common.summary(
            "train_step_peak_fraction", shape, flops / median["ours_per_row"] / 1e9, peak[0], peak[1], "GFLOP/s",
            f"ratio = fraction of measured matmul peak (on a GPU in bfloat16: the MFU) of ours with a full forward "
            f"per row (the reference's FLOPs); as the trainer runs it {flops / median['ours'] / 1e9:.1f} GFLOP/s "
            f"of the same FLOPs = {flops / median['ours'] / 1e9 / peak[1]:.2f}; "
            f"{torch_best} {flops / median[torch_best] / 1e9:.1f} GFLOP/s = "
            f"{flops / median[torch_best] / 1e9 / peak[1]:.2f} of peak; {formula}"),
    ]
