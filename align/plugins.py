"""User-supplied Python functions named in the config as 'module:function'."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from align.errors import ConfigError

RewardFn = Callable[[list[str], list[str]], list[float]]


def import_reward_fn(spec: str, key: str) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key} '{spec}' must have the form module:function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{key} '{spec}' is not an importable module:function ({exc})") from exc
    if not callable(fn):
        raise ConfigError(f"{key} '{spec}' is not callable")
    return fn
