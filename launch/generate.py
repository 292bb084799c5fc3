r"""Greedy generation through the explicit-KV-cache decoder, with parity checks.

    python launch/generate.py --config=configs/generate.py:demo --workdir=/tmp/rwr_demo

Builds the Med-RwR chat prompt with the Qwen2.5 tokenizer, prefills it into a KV cache,
decodes greedily to EOS or the token budget, then checks that (1) one full forward
pass over the final sequence reproduces every cached step's logits, and (2) with
--workdir, the params exported as a Hugging Face checkpoint load in `transformers`
(when PyTorch is installed) and give the same logits.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rwr_jax import config_lib, sharding  # noqa: E402
from rwr_jax.data import chat_template, tokenizer as tokenizer_lib  # noqa: E402
from rwr_jax.models.qwen2_vl import convert, inference  # noqa: E402
from rwr_jax.models.qwen2_vl.config import DecoderConfig, read_hf_config  # noqa: E402
from rwr_jax.models.qwen2_vl.decoder import DecoderLM, init_cache  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/generate.py:demo.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the exported HF checkpoint (optional).")

PARITY_ATOL = 1e-4


def load_model(cfg, mesh, rules) -> tuple[DecoderConfig, dict, dict | None]:
    """Reads a HF checkpoint, or initialises random params for the demo, sharded on `mesh`.

    Returns:
      (decoder config, params, source config.json or None).
    """
    fields = config_lib.decoder_fields(cfg.model)
    hf_config = None
    if cfg.model.checkpoint:
        overrides = {k: fields[k] for k in ("dtype", "param_dtype", "attention_kernel", "remat_policy")}
        config, hf_config = read_hf_config(cfg.model.checkpoint, **overrides)
    else:
        config = DecoderConfig(**fields)
    shardings = sharding.logical_shardings(convert.abstract_params(config), mesh, rules)
    if cfg.model.checkpoint:
        params = convert.load_hf_params(cfg.model.checkpoint, config, shardings=shardings)
    else:
        params = convert.init_params(config, cfg.seed, shardings)
    return config, params, hf_config


def greedy_generate(model: DecoderLM, params, prompt: np.ndarray, max_new_tokens: int,
                    eos_ids: tuple[int, ...]) -> tuple[list[int], np.ndarray]:
    """Greedy decoding of one prompt.

    Args:
      prompt: [T] int32 prompt ids.

    Returns:
      (generated ids, [T + n - 1, V] float32 logits of every position the cache saw).
    """
    tokens = jnp.asarray(prompt[None])
    mask = jnp.ones_like(tokens, bool)
    positions = inference.text_positions(mask)
    cache = init_cache(model.config, batch=1, max_length=len(prompt) + max_new_tokens)
    logits, cache = inference.prefill(model, params, tokens, mask, positions, cache)
    steps = [np.asarray(logits[0], np.float32)]
    next_logits = logits[:, -1]
    generated: list[int] = []
    position = len(prompt)
    for _ in range(max_new_tokens):
        token = int(jnp.argmax(next_logits[0]))
        generated.append(token)
        if token in eos_ids or len(generated) == max_new_tokens:
            break
        next_logits, cache = inference.decode(model, params, jnp.asarray([token], jnp.int32),
                                              jnp.asarray([position], jnp.int32), cache)
        steps.append(np.asarray(next_logits, np.float32))
        position += 1
    return generated, np.concatenate(steps, axis=0)


def full_forward_logits(model: DecoderLM, params, ids: np.ndarray) -> np.ndarray:
    """[T] ids -> [T, V] float32 logits from one uncached forward pass."""
    tokens = jnp.asarray(ids[None])
    mask = jnp.ones_like(tokens, bool)
    logits, _ = jax.jit(model.apply)({"params": params}, tokens, inference.text_positions(mask), mask)
    return np.asarray(logits[0], np.float32)


def transformers_logits(checkpoint_dir: str, ids: np.ndarray) -> np.ndarray | None:
    """[T, V] logits of `transformers` on the exported checkpoint, or None without torch."""
    try:
        import torch
        import transformers
    except ImportError:
        logging.info("PyTorch not installed: skipping the transformers comparison")
        return None
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids[None])).logits[0].numpy()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = _CONFIG.value
    mesh = sharding.make_mesh(dict(cfg.mesh))
    rules = sharding.rules_from_config(cfg.sharding_rules)
    tokenizer = tokenizer_lib.load_tokenizer(cfg.tokenizer_path or None)
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
        config, params, hf_config = load_model(cfg, mesh, rules)
        model = DecoderLM(config)
        prompt = chat_template.encode_prompt(tokenizer, cfg.question, system_prompt=cfg.system_prompt)
        logging.info("prompt: %d tokens; model: %d layers, width %d, vocab %d", len(prompt), config.num_layers,
                     config.hidden_size, config.vocab_size)
        start = time.perf_counter()
        generated, cached = greedy_generate(model, params, prompt, cfg.max_new_tokens, tokenizer_lib.EOS_IDS)
        logging.info("generated %d tokens in %.2f s (compile included)", len(generated),
                     time.perf_counter() - start)
        logging.info("completion: %r", tokenizer.decode(generated))
        ids = np.concatenate([prompt, np.asarray(generated[:-1], np.int32)])
        full = full_forward_logits(model, params, ids)
    diff = float(np.max(np.abs(full - cached)))
    logging.info("cached decoding vs full forward: max |dlogit| = %.2e", diff)
    if diff > PARITY_ATOL and config.dtype == "float32":
        raise RuntimeError(f"cached decoding differs from the full forward pass by {diff:.2e}")
    if _WORKDIR.value and config.mrope_section is not None:
        logging.warning("not exporting: a Qwen2.5-VL checkpoint is exported together with its vision tower")
    elif _WORKDIR.value:
        export_dir = os.path.join(_WORKDIR.value, "hf_export")
        convert.save_hf_checkpoint(params, config, hf_config or convert.to_hf_config(config), export_dir)
        reference = transformers_logits(export_dir, ids)
        if reference is not None:
            hf_diff = float(np.max(np.abs(reference - full)))
            logging.info("transformers on %s vs ours: max |dlogit| = %.2e", export_dir, hf_diff)
            if hf_diff > PARITY_ATOL and config.dtype == "float32":
                raise RuntimeError(f"exported checkpoint differs from ours in transformers by {hf_diff:.2e}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
