"""SLURM: render sbatch scripts from recipes, check layouts against allocations, chain stages.

The sbatch templates live in the repository's ``slurm/`` folder; ``render`` fills their
``#SBATCH`` header and settings block, ``layout`` refuses a job whose process count does
not fit the recipe's parallel layout, ``chain`` builds the jobs of ``megalong submit``
(preprocess, training stages, conversion) and ``submit`` hands a chain of jobs to
``sbatch`` with ``afterok`` dependencies.
"""

from megalong.slurm.chain import ChainRequest, build_chain, missing_files
from megalong.slurm.layout import JobShape, check_recipe_layout
from megalong.slurm.render import JobOptions, render_convert, render_preprocess, render_train
from megalong.slurm.submit import Stage, SubmitError, submit_chain

__all__ = [
    "ChainRequest",
    "JobOptions",
    "JobShape",
    "Stage",
    "SubmitError",
    "build_chain",
    "check_recipe_layout",
    "missing_files",
    "render_convert",
    "render_preprocess",
    "render_train",
    "submit_chain",
]
