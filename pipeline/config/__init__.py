"""The study's configuration: frozen dataclasses loaded from YAML, with `--set key=value` overrides.

Every value is checked when the config is loaded, so a typo or an impossible value fails at once
with one line that names the key, the value and what is allowed, before anything is written.
The dotted keys (`task.echo_step`, `model.num_layers`, ...) are the public vocabulary: the CLI's
`--set`, the search space and the Parquet column names all use them.

- sections.py: the sections as frozen dataclasses, each field's scope kept on the field.
- search.py: the searched keys, and every point of the search space checked by the sections'
  own rules.
- files.py: reading a YAML file and `--set` overrides; keys read under an old name.
- checks.py: the one-line ConfigError, and the checks of single values.
"""

from pipeline.config.checks import ConfigError, first_line
from pipeline.config.files import RENAMED_KEYS, config_from_dict, load_config, parse_override
from pipeline.config.search import SearchParam, short_name
from pipeline.config.sections import (
    LANE,
    RUN,
    SHARED,
    Config,
    ConvergenceConfig,
    ModelConfig,
    RayConfig,
    StudyConfig,
    TaskConfig,
    TrainConfig,
    keys_of_scope,
    ray_address,
)

__all__ = [
    "LANE",
    "RENAMED_KEYS",
    "RUN",
    "SHARED",
    "Config",
    "ConfigError",
    "ConvergenceConfig",
    "ModelConfig",
    "RayConfig",
    "SearchParam",
    "StudyConfig",
    "TaskConfig",
    "TrainConfig",
    "config_from_dict",
    "first_line",
    "keys_of_scope",
    "load_config",
    "parse_override",
    "ray_address",
    "short_name",
]
