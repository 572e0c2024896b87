"""Configuration helpers every network family shares: named configurations, and transformers configs
reduced to the arguments that rebuild the model (what a checkpoint's spec records)."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

# bookkeeping a transformers config carries that is not architecture
HF_BOOKKEEPING = ("transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype")


def named_config(config: str | Mapping[str, Any], table: Mapping[str, Mapping[str, Any]], model: str,
                 overrides: Mapping[str, Any], drop_none: bool = False) -> dict[str, Any]:
    """``config`` (a name in ``table`` or a dict, e.g. a checkpoint's) with ``overrides`` on top, copied;
    ``drop_none``: overrides that are None keep the configuration's value (bundle YAMLs pass null)."""
    if isinstance(config, str):
        if config not in table:
            raise ValueError(f"unknown {model} config {config!r}; known: {sorted(table)}")
        config = table[config]
    extra = {k: v for k, v in overrides.items() if not (drop_none and v is None)}
    return {**copy.deepcopy(dict(config)), **extra}


def hf_config_dict(config, drop: Iterable[str] = (), full: bool = False) -> dict[str, Any]:
    """A transformers config as the dict that rebuilds it, bookkeeping left out: what differs from the
    class defaults (``to_diff_dict``), or everything (``full``, for composite configs such as SAM2's)."""
    left_out = set(HF_BOOKKEEPING) | set(drop)
    return {k: v for k, v in (config.to_dict() if full else config.to_diff_dict()).items() if k not in left_out}
