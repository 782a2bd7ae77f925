"""Stages by name: the built-in ones and those that plugins add through entry points."""
from __future__ import annotations

import importlib

from ..errors import ConfigError
from .base import RunContext, Stage, StageOutcome


def __getattr__(name: str):
    if name == "StageParams":   # pydantic: only when asked for (see stages.base)
        from .base import StageParams

        return StageParams
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

ENTRY_POINT_GROUP = "castlib.stages"

_BUILTIN = {
    "index": "castlib.stages.index:IndexStage",
    "diff": "castlib.stages.diff:DiffStage",
    "sync": "castlib.stages.sync:SyncStage",
    "verify": "castlib.stages.verify:VerifyStage",
    "report": "castlib.stages.report:ReportStage",
    "http-push": "castlib.stages.http_push:HttpPushStage",
}


def stage_names() -> list[str]:
    from importlib.metadata import entry_points

    names = dict.fromkeys(_BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        names.setdefault(ep.name)
    return list(names)


def stage_class(name: str) -> type[Stage]:
    target = _BUILTIN.get(name)
    if target is None:
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == name:
                return ep.load()
        raise ConfigError(f"unknown stage {name!r} (known: {', '.join(stage_names())})")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["Stage", "StageOutcome", "StageParams", "RunContext", "stage_class", "stage_names"]
