"""Tasks: what a kind of query data needs (loading, preprocessing, model class, collator, metrics, reports)."""

from __future__ import annotations

from querytune.tasks.classification import ClassificationTask
from querytune.tasks.ranking import RerankTask, RetrievalTask
from querytune.tasks.rewrite import RewriteTask
from querytune.tasks.slots import IntentSlotsTask, SlotsTask

TASKS = {
    "intent": ClassificationTask,
    "text_classification": ClassificationTask,
    "slots": SlotsTask,
    "intent_slots": IntentSlotsTask,
    "rerank": RerankTask,
    "retrieval": RetrievalTask,
    "rewrite": RewriteTask,
}


def get_task(name: str):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]
