"""Tasks: what a kind of query data needs (loading, preprocessing, model class, collator, metrics, reports)."""

from __future__ import annotations

from querytune.tasks.classification import ClassificationTask

TASKS = {"intent": ClassificationTask, "text_classification": ClassificationTask}


def get_task(name: str):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]
