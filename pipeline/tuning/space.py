"""The search space of ``byol tune``: dotted config keys -> distributions, validated like ``--set`` (no Ray here).

A trial's config is the base config with its sampled values applied as overrides and validated again, so a
sampled value that the config would refuse (tau >= 1, an unknown schedule...) fails before any trial starts.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import Config, ConfigError, apply_overrides, config_from_dict, flatten

DISTRIBUTIONS = ("loguniform", "uniform", "one_minus_loguniform", "choice", "grid")


def trial_config(base: Config, values: dict[str, Any]) -> Config:
    """``base`` with the sampled ``values`` ({dotted key: value}) applied, validated, without the tune section."""
    tree = base.to_dict()
    tree.pop("tune", None)
    overrides = [f"{key}={_yaml_scalar(value)}" for key, value in values.items()]
    return config_from_dict(apply_overrides(tree, overrides))


def _yaml_scalar(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def validate_space(base: Config) -> None:
    """Every key exists in the config and every distribution's bounds/choices make a valid config."""
    if base.tune is None or not base.tune.space:
        raise ConfigError("tune.space: empty; give dotted keys, e.g. ema.tau_base: {one_minus_loguniform: [1e-3, 0.1]}")
    known = set(flatten(base.to_dict()))
    for key, spec in base.tune.space.items():
        if key not in known or key.startswith("tune."):
            raise ConfigError(f"tune.space.{key}: not a config key (e.g. optim.base_lr, ema.tau_base)")
        if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"tune.space.{key}: one of {', '.join(DISTRIBUTIONS)} with a list, got {spec}")
        kind, args = next(iter(spec.items()))
        if kind in ("loguniform", "uniform", "one_minus_loguniform"):
            if len(args) != 2 or not all(isinstance(a, int | float) for a in args) or not args[0] < args[1]:
                raise ConfigError(f"tune.space.{key}.{kind}: needs [low, high] with low < high, got {args}")
            if kind != "uniform" and args[0] <= 0:
                raise ConfigError(f"tune.space.{key}.{kind}: bounds must be > 0, got {args}")
            candidates = [1 - a for a in args] if kind == "one_minus_loguniform" else list(args)
        else:
            if not args:
                raise ConfigError(f"tune.space.{key}.{kind}: needs at least one value")
            candidates = list(args)
        for value in candidates:
            try:
                trial_config(base, {key: value})
            except ConfigError as err:
                raise ConfigError(f"tune.space.{key}: value {value!r} is not a valid config: {err}") from None


def ray_space(base: Config) -> dict[str, Any]:
    """The Ray Tune param_space, flat. ``one_minus_loguniform`` keys are searched as ``<key>@one_minus``
    (log-uniform 1 - tau), so every searcher and PBT's multiplicative mutations work on that scale."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in base.tune.space.items():
        kind, args = next(iter(spec.items()))
        if kind == "loguniform":
            out[key] = tune.loguniform(*args)
        elif kind == "uniform":
            out[key] = tune.uniform(*args)
        elif kind == "one_minus_loguniform":
            out[f"{key}{ONE_MINUS}"] = tune.loguniform(*args)
        elif kind == "choice":
            out[key] = tune.choice(args)
        else:
            out[key] = tune.grid_search(args)
    return out


ONE_MINUS = "@one_minus"


def trial_values(sampled: dict[str, Any]) -> dict[str, Any]:
    """Tune's config -> {dotted key: value}: ``key@one_minus`` samples x become ``key = 1 - x``."""
    out = {}
    for key, value in sampled.items():
        if key.endswith(ONE_MINUS):
            out[key.removesuffix(ONE_MINUS)] = 1 - value
        else:
            out[key] = value
    return out
