"""The GPU acceptance checks behind ``tools/gpu_check.py`` (see docs/gpu.md).

Each check is a function returning a :class:`~megalong.gpucheck.records.CheckResult`
(passed, failed or skipped, with its figures and the reason), so the report is complete by
construction. The modules:

* :mod:`records`: the result record, the verdict and the JSON report;
* :mod:`machine`: what this machine has (real imports, versions, GPUs) and ``--require``;
* :mod:`tolerances`: every numerical bound, derived from the rounding of bf16 / FP8;
* :mod:`compare`: relative errors, cosines and gradients keyed across layer implementations;
* :mod:`cases`: the inputs (packed documents, real text) and the model shapes checked;
* :mod:`runs` / :mod:`training`: building and running models, and short Trainer runs, as
  megalong's own training does;
* :mod:`checks`: the checks themselves, one module per area;
* :mod:`registry`: which checks exist, what each needs, which process group runs it;
* :mod:`worker` / :mod:`runner`: the processes that run them and the report they write.
"""
