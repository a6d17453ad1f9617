"""Face-recognition training (repo-level, not part of the wheel).

Building blocks so far: RecordIO packs without mxnet (`recordio.py`) and margin heads (`margin.py`).
"""
