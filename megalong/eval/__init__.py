"""Long-context evaluation: synthetic recall tasks and perplexity by position.

* :mod:`megalong.eval.tasks` builds recall prompts (needle-in-a-haystack with one or several
  keys, several values, JSON key-value retrieval) at exact token lengths and depths;
* :mod:`megalong.eval.scoring` scores answers by (substring) exact match;
* :mod:`megalong.eval.perplexity` measures loss by position on long held-out documents;
* :mod:`megalong.eval.models` runs a Hugging Face export or a megalong weights directory;
* :mod:`megalong.eval.evaluate` ties them together (``megalong eval``), writing JSON and plots.
"""
