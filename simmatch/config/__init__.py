"""Typed run configuration: the schema (every default and valid range), loading YAML files and
dotted overrides into it, and the values derived from it at a world size. No torch here."""
from simmatch.config.derive import (
    Derived,
    Scale,
    derive,
    derive_at,
    derive_scale,
    intervals_text,
    run_world_size,
    scale_at,
    steps_per_epoch,
    with_steps,
)
from simmatch.config.loading import (
                                     apply_overrides,
                                     choices,
                                     from_dict,
                                     load_config,
                                     parse_override,
                                     to_dict,
    upgrade_saved,
                                     validate,
                                     with_defaults,
)
from simmatch.config.schema import (
                                     RANGES,
                                     Config,
                                     DataConfig,
                                     MethodConfig,
                                     ModelConfig,
                                     OptimConfig,
                                     Range,
                                     TrainConfig,
)

__all__ = ["RANGES", "Config", "DataConfig", "Derived", "MethodConfig", "ModelConfig", "OptimConfig",
           "Range", "Scale", "TrainConfig", "apply_overrides", "choices", "derive", "derive_at", "derive_scale",
           "intervals_text", "from_dict", "load_config", "parse_override", "run_world_size", "scale_at",
           "steps_per_epoch", "to_dict", "upgrade_saved", "validate", "with_defaults", "with_steps"]
