"""Task readers (issue 13): document QA (SQuAD), summarization (ACLSum), multiple-choice QA (TruthfulQA),
each with train / validation / test splits; labelled classification sets (issue 14: Rotten Tomatoes, BBC
News, any text + label JSONL, Fashion-MNIST). Pure data: no model code."""

from ralm.data.tasks.base import SPLITS, ChoiceExample, LabelledData, LabelledExample, QAExample, SummaryExample
from ralm.data.tasks.labelled import LABELLED, load_labelled, read_labelled
from ralm.data.tasks.registry import TASKS, TaskSpec, get_task, load_splits, load_task, task_names, task_path

__all__ = ["LABELLED", "SPLITS", "TASKS", "ChoiceExample", "LabelledData", "LabelledExample", "QAExample",
           "SummaryExample", "TaskSpec", "get_task", "load_labelled", "load_splits", "load_task", "read_labelled",
           "task_names", "task_path"]
