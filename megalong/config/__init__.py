"""Configuration dataclasses and the YAML/override loader."""

from megalong.config.loader import ConfigError, apply_overrides, dump_yaml, from_dict, load, to_dict
from megalong.config.parallel import LayoutError, ParallelConfig

__all__ = [
    "ConfigError",
    "LayoutError",
    "ParallelConfig",
    "apply_overrides",
    "dump_yaml",
    "from_dict",
    "load",
    "to_dict",
]
