"""Evaluation tasks: each benchmark read as its dataset ships it, prompted, parsed and aggregated as the VideoNSA
fork of lmms-eval does (SPEC §7), plus the generic question file format. `TASKS` is the registry."""

from __future__ import annotations

from data.tasks import generic, longvideobench, mlvu, timescope, tomato, vsibench
from data.tasks.base import Item, Task

TASKS: dict[str, Task] = {task.name: task for task in (
    generic.TASK,
    longvideobench.TASK,
    mlvu.TASK,
    timescope.TIMESCOPE,
    timescope.LONGTIMESCOPE,
    tomato.TASK,
    vsibench.TASK,
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "Item", "Task", "get_task"]
