"""Helpers for `configs/*.py`: preset strings with typed defaults.

    get_config("demo")                      -> Preset(demo=True, ...)
    get_config("demo,max_new_tokens=8")     -> Preset(demo=True, max_new_tokens=8, ...)

Bare words set booleans to True; `key=value` is parsed with the type of the default;
an unknown key raises ValueError listing the known ones. Also: `decoder_fields` (a
config's model section -> DecoderConfig arguments) and `enable_compilation_cache`.
"""

import dataclasses
import os
from typing import Any

import ml_collections


def parse_preset(arg: str | None, **defaults: Any) -> ml_collections.FrozenConfigDict:
    """Parses a preset string like "demo,batch=4" against typed defaults.

    Args:
      arg: the text after ':' in `--config=configs/x.py:ARG`, or None.
      **defaults: every allowed key with its default value (its type is the key's type).

    Returns:
      A frozen config of all keys.
    """
    values = dict(defaults)
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        key, sep, text = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown preset key {key!r} in {arg!r}; known keys: {sorted(defaults)}")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"preset key {key!r} needs a value ({key}=...), got a bare word")
            values[key] = True
        elif isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"preset key {key!r} expects true/false, got {text!r}")
            values[key] = text.lower() in ("true", "1")
        else:
            try:
                values[key] = type(default)(text)
            except ValueError:
                raise ValueError(f"preset key {key!r} expects {type(default).__name__}, got {text!r}") from None
    return ml_collections.FrozenConfigDict(values)


def decoder_fields(config: Any) -> dict[str, Any]:
    """The DecoderConfig keyword arguments held in a `config.model` section."""
    from rwr_jax.models.qwen2_vl.config import DecoderConfig  # configs stay importable without jax

    names = {f.name for f in dataclasses.fields(DecoderConfig)}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in names}


def enable_compilation_cache(cache_dir: str, workdir: str) -> None:
    """Points JAX's persistent compilation cache at `cache_dir` ("{workdir}" filled in; "" = off)
    unless the environment's JAX_COMPILATION_CACHE_DIR already chose one (config field
    `compilation_cache_dir`: a resumed run loads its compiled programs)."""
    import jax  # pylint: disable=g-import-not-at-top  (configs stay importable without jax)

    if cache_dir and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", cache_dir.format(workdir=workdir))
