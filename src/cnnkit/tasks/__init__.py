"""One package per task: its options (``config.py``, no torch), training ``Task``, inference
``Pipeline`` and workflow spec. This module finds them by name without importing torch."""

from __future__ import annotations

import importlib

from cnnkit.errors import CnnkitError

# task name -> (package, config class, spec object in the package's spec.py)
TASKS: dict[str, tuple[str, str, str]] = {
    "classify": ("classify", "ClassifyConfig", "SPEC"),
    "multilabel": ("multilabel", "MultiLabelConfig", "SPEC"),
    "detect": ("detect", "DetectConfig", "DETECT"),
    "instance": ("detect", "InstanceConfig", "INSTANCE"),
    "segment": ("segment", "SegmentConfig", "SPEC"),
    "medical": ("medical", "MedicalConfig", "SPEC"),
}


def _entry(task: str) -> tuple[str, str, str]:
    if task in TASKS:
        return TASKS[task]
    import difflib

    close = difflib.get_close_matches(str(task), TASKS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise CnnkitError(f"unknown task '{task}'{hint}; tasks: {', '.join(TASKS)}")


def config_class(task: str) -> type:
    """The torch-free options dataclass of ``task`` (with ``VAL`` and ``PREDICT`` options)."""
    package, cls, _ = _entry(task)
    return getattr(importlib.import_module(f"cnnkit.tasks.{package}.config"), cls)


def spec(task: str):
    """The :class:`~cnnkit.engine.workflow.WorkflowSpec` of ``task`` (imports torch)."""
    package, _, name = _entry(task)
    return getattr(importlib.import_module(f"cnnkit.tasks.{package}.spec"), name)
