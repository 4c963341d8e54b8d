"""Preprocessing: raw corpora -> Megatron-Core indexed datasets (``.bin/.idx`` + ``.json``).

Entry points: ``megalong preprocess`` (megalong/cli/preprocess.py) and
``tools/preprocess_data.py``; in Python, ``run(PreprocessConfig(...), load_tokenizer(...))``.
"""

from megalong.data.preprocess.config import PreprocessConfig
from megalong.data.preprocess.pipeline import IncompleteError, PlanMismatchError, array_task_from_env, run
from megalong.data.preprocess.report import BadInputError
from megalong.data.preprocess.sources import InputError

__all__ = ["BadInputError", "IncompleteError", "InputError", "PlanMismatchError", "PreprocessConfig",
           "array_task_from_env", "run"]
