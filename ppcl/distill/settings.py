"""Every knob of a distillation run: :class:`ppcl.settings.DistillSettings` (one definition for the CLI, the run
config and the pipeline; recorded in ``run.json``), re-exported here where the training code looks for it."""

from __future__ import annotations

from typing import Any, get_args

from ppcl.settings import DistillMode, DistillSettings, validate_settings

MODES: tuple[str, ...] = get_args(DistillMode)


def resolve_settings(settings: DistillSettings | None, overrides: dict[str, Any]) -> DistillSettings:
    """``settings`` (default: the model's defaults) with single fields replaced by ``overrides``, validated
    again as a whole (cross-field rules such as warm-up < steps hold for the result); bad values -> one-line
    :class:`ppcl.errors.PPCLError` naming the field."""
    base = (settings or DistillSettings()).model_dump()
    return validate_settings(DistillSettings, {**base, **overrides})  # type: ignore[return-value]


__all__ = ["MODES", "DistillSettings", "resolve_settings"]
