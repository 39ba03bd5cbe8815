"""Experiments and measurements: scripts that import the product (common, producer, trainer, evaluator)
and that no product module imports. Run them as ``python -m tools.<name>``; their figures are in docs/bench."""
