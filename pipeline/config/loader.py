"""Typed YAML config: `load(Schema, path, overrides)` merges a YAML file (and the recipes it
extends with `base:`) and command-line `key=value` overrides onto a dataclass schema with omegaconf.
Everything is checked before anything heavy runs: an unknown key names the nearest valid one (or
its new place, from the schema's MOVED_KEYS), a choice (an Enum) names the valid values, and each
section's `__post_init__` checks its ranges.
"""

from __future__ import annotations

import difflib
import os
import typing
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A config that does not match its schema."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _schema_at(schema: type, dotted: str) -> Optional[type]:
    """The dataclass reached by following `dotted` from `schema` (through Optional and Dict)."""
    node: Any = schema
    parts = [p for p in dotted.split(".") if p]
    while parts and is_dataclass(node):
        hint = typing.get_type_hints(node).get(parts.pop(0))
        if typing.get_origin(hint) is dict:
            if not parts:
                return None
            parts.pop(0)  # the dict key, e.g. a stream's name
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        node = hint if is_dataclass(hint) else (args[-1] if args else None)
    return node if not parts and is_dataclass(node) else None


def _unknown_key_message(schema: type, full_key: str, source: str) -> str:
    moved = getattr(schema, "MOVED_KEYS", {}).get(full_key)
    if moved:
        return f"Unknown config key '{full_key}' (from {source}). Did you mean '{moved}'? It moved there."
    parent, _, leaf = full_key.rpartition(".")
    node = _schema_at(schema, parent)
    valid = sorted(f.name for f in fields(node)) if node is not None else []
    near = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{(parent + '.') if parent else ''}{near[0]}'?" if near else ""
    where = f"'{parent}'" if parent else "the top level"
    return f"Unknown config key '{full_key}' (from {source}).{hint} Valid keys at {where}: {', '.join(valid)}"


def _merge(schema: type, base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as err:
        raise ConfigError(_unknown_key_message(schema, str(err.full_key), source)) from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"Invalid config value (from {source}): {err}") from None


BASE_KEY = "base"  # a recipe extends another: `base: flip_b16.yaml` (relative to this file)


def _recipe_chain(path: str, extending: tuple = ()) -> list:
    """[(YAML, path)] from the deepest `base:` to `path` itself."""
    if not os.path.isfile(path):
        within = f" (the base of {extending[-1]})" if extending else ""
        raise ConfigError(f"Config file {path} does not exist{within}")
    if os.path.abspath(path) in map(os.path.abspath, extending):
        raise ConfigError(f"Config files extend each other in a cycle: {' -> '.join((*extending, path))}")
    node = OmegaConf.load(path)
    base = node.pop(BASE_KEY, None) if isinstance(node, DictConfig) else None
    if base is None:
        return [(node, path)]
    return _recipe_chain(os.path.join(os.path.dirname(path), str(base)), (*extending, path)) + [(node, path)]


def load(schema: type, path: Optional[str] = None, overrides: Sequence[str] = ()) -> Any:
    """Schema defaults <- YAML file (after the recipes it extends) <- `key=value` overrides,
    validated; returns a typed object."""
    cfg = OmegaConf.structured(schema)
    for node, source in _recipe_chain(path) if path is not None else []:
        cfg = _merge(schema, cfg, node, source)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"Overrides must look like key=value, got: {' '.join(bad)}")
    if overrides:
        cfg = _merge(schema, cfg, OmegaConf.from_dotlist(list(overrides)), "command line")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"Missing required config keys: {', '.join(missing)}")
    try:
        OmegaConf.resolve(cfg)
        return OmegaConf.to_object(cfg)  # runs every section's __post_init__ checks
    except OmegaConfBaseException as err:
        raise ConfigError(f"Could not resolve config: {err}") from None


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
