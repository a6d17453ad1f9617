"""Photos in, faces out: detection, alignment to the ArcFace template, embeddings, comparison and search.

    from timm_mobileone.faces import FaceEmbedder
    faces = FaceEmbedder('hf-hub:<repo>')             # or a model name + checkpoint, or an exported artifact
    a, b = faces(['a.jpg', 'b.jpg'])
    cosine = float(a.face.embedding @ b.face.embedding)

Commands: `python -m timm_mobileone.faces compare|embed|search`. Light to import: OpenCV, scikit-image and the
model load only when used (`pip install 'timm-mobileone[faces]'`).
"""
__all__ = ['FaceEmbedder', 'Face', 'PhotoFaces']


def __getattr__(name):
    if name in __all__:
        from . import embedder
        return getattr(embedder, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
