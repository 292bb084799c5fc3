"""Name -> function registries with fixed categories.

Attention kernels, rewards, advantage estimators and losses are chosen by name from
config. Each category is fixed up front; registering a name twice raises, and an
unknown name raises an error listing the valid choices.

    @register("attention", "xla")
    def xla_attention(...): ...

    fn = lookup("attention", config.attention_kernel)
"""

from typing import Any, Callable, TypeVar

CATEGORIES = frozenset({"attention", "reward", "advantage", "loss"})

_F = TypeVar("_F", bound=Callable[..., Any])
_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {c: {} for c in CATEGORIES}


def _check_category(category: str) -> None:
    if category not in CATEGORIES:
        raise ValueError(f"unknown registry category {category!r}; expected one of {sorted(CATEGORIES)}")


def register(category: str, name: str) -> Callable[[_F], _F]:
    """Returns a decorator that registers a function under `category`/`name`."""
    _check_category(category)

    def decorator(fn: _F) -> _F:
        if name in _REGISTRY[category]:
            raise ValueError(f"{category} {name!r} is already registered (by {_REGISTRY[category][name]!r})")
        _REGISTRY[category][name] = fn
        return fn

    return decorator


def lookup(category: str, name: str) -> Callable[..., Any]:
    """Returns the function registered under `category`/`name`."""
    _check_category(category)
    try:
        return _REGISTRY[category][name]
    except KeyError:
        raise LookupError(
                f"no {category} named {name!r}; registered: {sorted(_REGISTRY[category])}"
        ) from None


def names(category: str) -> list[str]:
    """Lists the names registered in `category`, sorted."""
    _check_category(category)
    return sorted(_REGISTRY[category])
