"""Evaluation entry points (repo-level, not part of the wheel): `python -m eval.lfw`, `eval.cfp`, `eval.verify`."""
