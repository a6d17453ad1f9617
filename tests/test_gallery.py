"""Face galleries on disk and exact search (timm_mobileone.faces.gallery): the top-k a full sort gives, a file that
is memory-mapped rather than read, and one GalleryError line for any file that is not a whole gallery."""
import io
import zipfile

import numpy as np
import pytest

from timm_mobileone.faces.gallery import GalleryError, open_gallery, save_gallery, search


def _full_scores(gallery: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Every cosine, in float64 (the answer the chunked float32 products must give, to their rounding)."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return q @ np.asarray(gallery, np.float64).T


@pytest.mark.parametrize('n, dim, dtype, chunk', [(1000, 32, 'float32', 97), (257, 512, 'float16', 64),
                                                  (5, 8, 'float32', 2)])
def test_search_is_exact_in_chunks(tmp_path, n, dim, dtype, chunk):
    rng = np.random.default_rng(n)
    e = rng.standard_normal((n, dim))
    e[1] = e[3] = e[4]  # ties, across chunk borders where chunk is small
    paths = [f'people/{i}/ü {i}.jpg' for i in range(n)]
    g = open_gallery(save_gallery(tmp_path / 'g.npz', e, paths, dict(model='m'), dtype), dim)
    assert isinstance(g.embeddings, np.memmap) and g.embeddings.dtype == np.dtype(dtype)
    assert len(g) == n and g.paths == paths and g.path(3) == paths[3] and g.meta['model'] == 'm'
    queries = np.concatenate([rng.standard_normal((3, dim)), e[[4]]])
    full = _full_scores(g.embeddings, queries)
    for k in (1, 3, 10):
        scores, rows = search(g, queries, k=k, chunk=chunk)
        # exact: the k best cosines, each row's reported score its own (no entry better than the k-th is missed)
        assert np.allclose(scores, -np.sort(-full, axis=1)[:, :k], atol=1e-6)
        assert np.allclose(np.take_along_axis(full, rows, axis=1), scores, atol=1e-6)
        assert (np.diff(scores, axis=1) <= 0).all() and all(len(set(r)) == len(r) for r in rows)
    assert sorted(search(g, e[4], k=3, chunk=chunk)[1][0]) == [1, 3, 4]  # the three copies of one embedding


def test_a_gallery_of_another_size_is_one_line(tmp_path):
    f = save_gallery(tmp_path / 'g.npz', np.ones((3, 128)), ['a', 'b', 'c'], dict(model='mobileone_112_s0'))
    with pytest.raises(GalleryError, match='holds 128-d embeddings made by mobileone_112_s0; the queries are 512-d'):
        open_gallery(f, 512)


def _tampered(tmp_path, how: str):
    f = save_gallery(tmp_path / 'g.npz', np.eye(4, 16), ['a', 'b', 'c', 'd'], {})
    data = f.read_bytes()
    if how.startswith('truncated'):
        f.write_bytes(data[:int(len(data) * float(how.split(':')[1]))])
    elif how == 'compressed':
        with np.load(f) as z:
            np.savez_compressed(f, **{k: z[k] for k in z.files})
    elif how in ('meta', 'offsets', 'no_paths'):
        with np.load(f) as z:
            arrays = {k: z[k] for k in z.files}
        if how == 'meta':
            arrays['meta'] = np.frombuffer(b'{"count": 9, "dim": 16}', np.uint8)
        elif how == 'offsets':
            arrays['path_offsets'] = np.array([0, 5, 2, 3, 4], np.int64)
        else:
            del arrays['paths']
        np.savez(f, **arrays)
    elif how == 'header':  # the embeddings' header declares more rows than the entry holds
        f.write_bytes(data.replace(b"'shape': (4, 16)", b"'shape': (9, 16)"))
    elif how == 'not_zip':
        f.write_bytes(b'hello' * 100)
    return f


@pytest.mark.parametrize('how, match', [
    ('truncated:0.5', 'not a gallery file|past the end'), ('truncated:0.99', 'not a gallery file|past the end'),
    ('compressed', 'compressed'), ('meta', 'meta says 9 x 16'), ('offsets', 'path offsets'),
    ('no_paths', 'no paths'), ('header', 'declares'), ('not_zip', 'not a gallery file'),
])
def test_a_tampered_gallery_is_one_line(tmp_path, how, match):
    with pytest.raises(GalleryError, match=match) as e:
        open_gallery(_tampered(tmp_path, how))
    assert '\n' not in str(e.value)
