"""Evaluation entry points (repo-level, not part of the wheel): `python -m eval.lfw`, `eval.cfp`, `eval.verify`,
`eval.ijb`, `eval.imagenet`, `eval.align`. As a library: `eval.api`, eval's one public module (this file imports
nothing, so that `import eval.x` stays light and no name here shadows a CLI module)."""
