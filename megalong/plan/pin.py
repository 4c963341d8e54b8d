"""A partly fixed layout: ``megalong plan --layout tp=4,pp=8,vp=5,cp=2,mbs=1,recompute=full``.

The dimensions given are held fixed; the planner searches the others. Keys:

  tp, pp, cp, dp       tensor / pipeline / context / data parallel sizes
  vp                   virtual pipeline stages per rank (1 or none: no interleaving)
  mbs                  micro-batch size
  recompute            none, selective or full
  dist_opt             true/false: Megatron's distributed optimizer
  precision            bf16 or fp8
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence, TypeVar

from megalong.config.loader import ConfigError

T = TypeVar("T")

_NONE = object()  # "no value pinned" for fields whose pinned value may itself be None (vp, recompute)


@dataclass(frozen=True)
class LayoutPin:
    tp: Optional[int] = None
    pp: Optional[int] = None
    cp: Optional[int] = None
    dp: Optional[int] = None
    vp: object = _NONE  # int, or None for no interleaving
    mbs: Optional[int] = None
    recompute: object = _NONE  # None, "selective" or "full"
    distributed_optimizer: Optional[bool] = None
    precision: Optional[str] = None

    def is_pinned(self, name: str) -> bool:
        value = getattr(self, name)
        return value is not _NONE and (value is not None or name in ("vp", "recompute"))

    def choices(self, name: str, options: Sequence[T]) -> list[T]:
        """``[the pinned value]`` when ``name`` is pinned, else ``options``."""
        return [getattr(self, name)] if self.is_pinned(name) else list(options)

    def check_world(self, world_size: int) -> None:
        """Refuse pinned parallel sizes that cannot cover ``world_size`` GPUs."""
        given = {name: getattr(self, name) for name in ("tp", "pp", "cp", "dp") if getattr(self, name) is not None}
        product = 1
        for value in given.values():
            product *= value
        named = " x ".join(f"{name}={value}" for name, value in given.items())
        if world_size % product or (len(given) == 4 and product != world_size):
            raise ConfigError(f"--layout: {named} = {product} cannot cover the {world_size} GPUs")

    def describe(self) -> str:
        parts = []
        for f in fields(self):
            if self.is_pinned(f.name):
                value = getattr(self, f.name)
                parts.append(f"{f.name}={'none' if value is None else value}")
        return ",".join(parts) or "(nothing pinned)"


_INT_KEYS = {"tp": "tp", "pp": "pp", "cp": "cp", "dp": "dp", "mbs": "mbs"}


def parse_layout(text: str) -> LayoutPin:
    """``"tp=4,pp=8,vp=5,cp=2,mbs=1,recompute=full"`` -> LayoutPin; errors name the key."""
    values: dict[str, object] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key, raw = key.strip().lower(), raw.strip().lower()
        if not sep or not raw:
            raise ConfigError(f"--layout: {item!r} is not key=value (e.g. tp=4,cp=2,recompute=full)")
        if key in values or (key == "dist_opt" and "distributed_optimizer" in values):
            raise ConfigError(f"--layout: {key} is given twice")
        if key in _INT_KEYS or key == "vp":
            if key == "vp" and raw in ("none", "1"):
                values["vp"] = None
                continue
            try:
                number = int(raw)
            except ValueError:
                raise ConfigError(f"--layout: {key}={raw!r} is not a whole number") from None
            if number < 1:
                raise ConfigError(f"--layout: {key} must be at least 1, got {number}")
            values[_INT_KEYS.get(key, key)] = number
        elif key == "recompute":
            if raw not in ("none", "selective", "full"):
                raise ConfigError(f"--layout: recompute={raw!r}; use none, selective or full")
            values["recompute"] = None if raw == "none" else raw
        elif key == "dist_opt":
            if raw not in ("true", "false"):
                raise ConfigError(f"--layout: dist_opt={raw!r}; use true or false")
            values["distributed_optimizer"] = raw == "true"
        elif key == "precision":
            if raw not in ("bf16", "fp8"):
                raise ConfigError(f"--layout: precision={raw!r}; use bf16 or fp8")
            values["precision"] = raw
        else:
            raise ConfigError(f"--layout: unknown key {key!r}; known: tp, pp, vp, cp, dp, mbs, recompute, "
                              f"dist_opt, precision")
    return LayoutPin(**values)
