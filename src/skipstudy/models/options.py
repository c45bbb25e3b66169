"""Argument checks every model builder shares (the option-specific ones live with their code)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from skipstudy.errors import ConfigError


def check_builder_args(
    arch: str, num_classes: object, in_channels: object, unknown: Mapping[str, object], options: Iterable[str]
) -> None:
    """Refuse unknown ``model.*`` keys and non-positive class/channel counts before building."""
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(
            f"model.{key}={unknown[key]!r} is not an option of {arch}; valid options: {', '.join(options)}"
        )
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer (it comes from the dataset)")


def check_skip(skip: object) -> None:
    """Refuse anything but a real bool: OmegaConf turns ``model.skip=maybe`` into a string."""
    if not isinstance(skip, bool):
        raise ConfigError(f"model.skip={skip!r} must be true or false")
