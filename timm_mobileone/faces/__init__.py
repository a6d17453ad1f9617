"""Photos in, faces out: detection, alignment to the ArcFace template, embeddings, comparison and search.

Light to import: each submodule imports OpenCV, scikit-image or a runtime only when used (`pip install
'timm-mobileone[faces]'`).
"""
