"""Task readers (issue 13): document QA (SQuAD), summarization (ACLSum), multiple-choice QA (TruthfulQA),
each with train / validation / test splits. Pure data: no model code."""

from ralm.data.tasks.base import SPLITS, ChoiceExample, QAExample, SummaryExample
from ralm.data.tasks.registry import TASKS, TaskSpec, get_task, load_splits, load_task, task_names, task_path

__all__ = ["SPLITS", "TASKS", "ChoiceExample", "QAExample", "SummaryExample", "TaskSpec", "get_task",
           "load_splits", "load_task", "task_names", "task_path"]
