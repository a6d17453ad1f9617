"""Photos in, faces out from the package (`timm_mobileone.faces`): FaceEmbedder's statuses and crops, and the
compare / embed / search commands (in-process main(argv), one subprocess for the process's own exit code).

Photos are real LFW faces (`lfw_dev` crops, shared data) put into larger frames by a known transform; the tests skip
without the shared data. The model is `mobileone_112_test` with random weights: these tests are about what the
pipeline does, not about a model's accuracy (docs/faces.md has that, with a trained model).
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import FACE_PEOPLE, face_photo, lfw_crop, needs_lfw_dev, run_main

cv2 = pytest.importorskip('cv2')
pytestmark = needs_lfw_dev
REPO = Path(__file__).resolve().parents[1]
MODEL = ['--model', 'mobileone_112_test']  # + --checkpoint: one set of random weights for every run (fixture)


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    """people/<name>/<n>.jpg for 3 people x 2 photos, plus a photo without a face and a file that is no image."""
    root = tmp_path_factory.mktemp('faces') / 'people'
    for i, person in enumerate(FACE_PEOPLE[:3]):
        (root / person).mkdir(parents=True)
        for n in (1, 2):
            cv2.imwrite(str(root / person / f'{n}.jpg'), face_photo(lfw_crop(person, n), 10 * i + n))
    cv2.imwrite(str(root / 'noise.png'), np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    (root / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not a whole jpeg')
    return root


@pytest.fixture(scope='module', autouse=True)
def weights(tmp_path_factory):
    """One set of random weights, so separate runs (an interrupted one and its resume) embed alike."""
    import timm
    import torch
    path = tmp_path_factory.mktemp('weights') / 'test.pth'
    torch.save(timm.create_model('mobileone_112_test').state_dict(), path)
    MODEL[2:] = ['--checkpoint', str(path)]
    return path


@pytest.fixture(scope='module')
def embedder(weights):
    from timm_mobileone.faces import FaceEmbedder
    return FaceEmbedder('mobileone_112_test', str(weights), batch_size=4)


def test_each_photo_gets_a_status_and_its_faces(photos, embedder):
    from PIL import Image

    from timm_mobileone.faces import align as A
    path = photos / FACE_PEOPLE[0] / '1.jpg'
    rgb = cv2.imread(str(path))[:, :, ::-1].copy()
    results = embedder([path, Image.open(path), rgb, photos / 'noise.png', photos / 'broken.jpg',
                        np.zeros((4, 4, 3), np.uint8)])
    assert [r.status for r in results] == ['ok', 'ok', 'ok', 'no_face', 'error', 'error']
    assert 'truncated' in results[4].error or 'decoded' in results[4].error
    # the crop is the one eval.align writes (before its JPEG encoding), the same from a path, PIL or an array
    crop, _ = A.align_photo(A.read_photo(path.read_bytes()), embedder.detector, A.AlignSettings('-'))
    for r in results[:3]:
        assert np.array_equal(r.face.crop, crop)
        assert r.face.embedding.shape == (512,) and abs(np.linalg.norm(r.face.embedding) - 1) < 1e-5
        assert np.allclose(r.face.embedding, results[0].face.embedding, atol=1e-6)
    assert results[0].to_json()['score'] > 0.5 and len(results[0].to_json()['landmarks']) == 5


def test_embed_crops_is_insightfaces_rule(embedder):
    """(x / 255 - mean) / std, image + flip summed, then L2-normalised: what eval embeds."""
    import torch
    crops = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    x = (x - 0.5) / 0.5
    with torch.no_grad():
        raw = (embedder.model(x) + embedder.model(x.flip(3))).double()
    want = torch.nn.functional.normalize(raw, dim=1).numpy()
    assert np.allclose(embedder.embed_crops(crops), want, atol=1e-5)


def test_compare(photos, tmp_path):
    a, b = photos / FACE_PEOPLE[0] / '1.jpg', photos / FACE_PEOPLE[0] / '2.jpg'
    out = json.loads(run_main('timm_mobileone.faces.__main__', 'compare', a, b, *MODEL, '--threshold', '-1').stdout)
    assert out['same'] is True and -1 <= out['cosine'] <= 1 and out['embedder']['model'] == 'mobileone_112_test'
    proc = run_main('timm_mobileone.faces.__main__', 'compare', a, b, *MODEL)
    out = json.loads(proc.stdout)
    assert out['same'] is None and 'no threshold' in out['note'] and proc.returncode == 0
    # the threshold of an eval result: cosine 1 - t/2 of the median fold threshold (squared distance)
    results = tmp_path / 'result.json'
    results.write_text(json.dumps(dict(results=[dict(dataset='lfw', thresholds=[1.2, 1.4, 1.3])])))
    out = json.loads(run_main('timm_mobileone.faces.__main__', 'compare', a, b, *MODEL, '--results', results).stdout)
    assert out['threshold'] == pytest.approx(1 - 1.3 / 2) and out['same'] == (out['cosine'] >= 0.35)


@pytest.mark.parametrize('argv, message', [
    (['compare', '{p}/nope.jpg', '{p}/noise.png'], 'nope.jpg: no such file'),
    (['compare', f'{{p}}/{FACE_PEOPLE[0]}/1.jpg', '{p}/noise.png'], 'noise.png: no face found'),
    (['compare', f'{{p}}/{FACE_PEOPLE[0]}/1.jpg', '{p}/broken.jpg'], 'broken.jpg: cannot be decoded'),
    (['compare', '{p}/noise.png', '{p}/noise.png', '--threshold', '2'], '--threshold 2.0: a cosine'),
    (['compare', '{p}/noise.png', '{p}/noise.png', '--results', '{p}/noise.png'], 'not a readable JSON'),
    (['search', '--gallery', '{p}/noise.png', '--query', '{p}/noise.png'], 'not a gallery file'),
    (['embed', '{p}', '--out', '{p}/g.txt'], 'a gallery is a .npz file'),
    (['compare', '{p}/noise.png', '{p}/noise.png', '--artifact', '{p}/noise.png'], 'needs its runtime'),
    (['compare', '{p}/noise.png', '{p}/noise.png', '--device', 'bogus'], "device 'bogus'"),
    (['compare', '{p}/noise.png', '{p}/noise.png', '--results', '{p}/deep.json'], 'not a readable JSON'),
    (['compare', '{p}/noise.png', '{p}/noise.png', '--results', '{p}/bools.json'], 'no verification thresholds'),
    (['compare', '{p}', '{p}/noise.png'], 'not a regular file'),
    (['search', '--gallery', '{p}/noise.png', '--query', '{p}/noise.png', '--chunk', '0'], '--chunk 0'),
    (['embed', '{p}', '--out', '{p}/folder.npz', '--overwrite'], 'exists and is not a file'),
])
def test_user_errors_are_one_line(photos, argv, message):
    (photos / 'deep.json').write_text('[' * 200000)
    (photos / 'bools.json').write_text('{"thresholds": [true, false]}')
    (photos / 'folder.npz').mkdir(exist_ok=True)
    proc = run_main('timm_mobileone.faces.__main__', *[a.format(p=photos) for a in argv], *MODEL)
    assert proc.returncode == 2 and proc.stdout == '', proc
    assert proc.stderr.startswith('error: ') and proc.stderr.count('\n') == 1 and message in proc.stderr, proc.stderr


def _embed_interrupted_at_second_batch(monkeypatch, argv):
    """`faces embed argv` with Ctrl-C raised as its second batch starts: the process's result."""
    from timm_mobileone.faces import embedder as E
    real, calls = E.FaceEmbedder.__call__, {'n': 0}

    def interrupted(self, photos, all_faces=True):
        calls['n'] += 1
        if calls['n'] == 2:
            raise KeyboardInterrupt
        return real(self, photos, all_faces)

    with monkeypatch.context() as m:
        m.setattr(E.FaceEmbedder, '__call__', interrupted)
        return run_main('timm_mobileone.faces.__main__', *argv)


def test_embed_resumes_and_search_finds_the_same_person(photos, tmp_path, monkeypatch):
    from timm_mobileone.faces.gallery import open_gallery
    gallery = tmp_path / 'g.npz'
    argv = ['embed', photos, '--out', gallery, *MODEL, '-b', '2', '--no-progress']
    proc = _embed_interrupted_at_second_batch(monkeypatch, argv)
    assert proc.returncode == 130 and 'resumes' in proc.stderr and not gallery.exists()
    out = json.loads(run_main('timm_mobileone.faces.__main__', *argv).stdout)
    assert out['photos'] == 8 and out['embedded'] == 6 and out['statuses'] == {'ok': 6, 'no_face': 1, 'error': 1}
    g = open_gallery(gallery, 512)
    assert sorted(g.paths) == sorted(f'{p}/{n}.jpg' for p in FACE_PEOPLE[:3] for n in (1, 2))
    assert not gallery.with_name('g.npz.partial').exists()
    # resumed == uninterrupted, row for row
    clean = tmp_path / 'clean.npz'
    run_main('timm_mobileone.faces.__main__', 'embed', photos, '--out', clean, *MODEL, '--no-progress')
    c = open_gallery(clean)
    order = [c.paths.index(p) for p in g.paths]
    assert np.allclose(np.asarray(g.embeddings), np.asarray(c.embeddings)[order], atol=1e-6)
    query = photos / FACE_PEOPLE[1] / '2.jpg'
    out = json.loads(run_main('timm_mobileone.faces.__main__', 'search', '--gallery', gallery, '--query', query,
                              '-k', '3', *MODEL).stdout)
    assert out['matches'][0]['photo'] == f'{FACE_PEOPLE[1]}/2.jpg' and out['matches'][0]['cosine'] > 0.999
    assert len(out['matches']) == 3 and out['entries'] == 6
    records = [json.loads(line) for line in gallery.with_name('g.npz.records.jsonl').read_text().splitlines()]
    assert {r['photo']: r['status'] for r in records}['broken.jpg'] == 'error'


def test_an_artifact_names_itself(tmp_path):
    """An exported model embeds as its PyTorch source does, and the embedder names the artifact, not a model."""
    pytest.importorskip('onnxruntime')
    import timm
    import torch

    from timm_mobileone import export
    from timm_mobileone.faces import FaceEmbedder
    weights = tmp_path / 'w.pth'
    torch.save(timm.create_model('mobileone_112_test').state_dict(), weights)
    path = tmp_path / 'test.onnx'
    export.main(['--model', 'mobileone_112_test', '--checkpoint', str(weights), '--onnx', str(path)])
    onnx = FaceEmbedder('mobileone_112_test', artifact=str(path), runtime='onnx')
    assert onnx.info['artifact'] == str(path) and onnx.info['runtime'] == 'onnx' and len(onnx.info['sha256']) == 64
    assert 'model' not in onnx.info
    crops = np.random.default_rng(1).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    source = FaceEmbedder('mobileone_112_test', str(weights))
    assert np.allclose(onnx.embed_crops(crops), source.embed_crops(crops), atol=1e-4)


def test_compare_exit_code_of_the_process(photos):
    proc = subprocess.run([sys.executable, '-m', 'timm_mobileone.faces', 'compare', str(photos / 'nope.jpg'),
                           str(photos / 'noise.png'), *MODEL], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.strip().count('\n') == 0 and 'no such file' in proc.stderr


def test_hostile_photos_get_a_status_each(photos, embedder, tmp_path):
    """Every kind of photo a stranger sends: each gets a status and nothing raises for the batch; a folder with a
    symlink loop is listed once."""
    from PIL import Image

    from benchmarks.fuzz_targets import png_declaring
    face = Image.open(photos / FACE_PEOPLE[0] / '1.jpg')
    files = {}
    for name, image, kwargs in [
            ('cmyk.jpg', face.convert('CMYK'), {}), ('palette.png', face.convert('P'), {}),
            ('alpha.png', face.convert('RGBA'), {}), ('gray.png', face.convert('L'), {}),
            ('sixteen.png', Image.fromarray(np.asarray(face.convert('L')).astype(np.uint16) * 257), {}),
            ('animated.gif', face, dict(save_all=True, append_images=[face.rotate(90)])),
            ('tiny.png', Image.new('RGB', (1, 1)), {})]:
        image.save(tmp_path / name, **kwargs)
        files[name] = tmp_path / name
    exif = face.getexif()
    exif[0x0112] = 6  # rotated: the pixels lie on their side, the tag says so
    face.rotate(90, expand=True).save(tmp_path / 'rotated.jpg', exif=exif)
    files['rotated.jpg'] = tmp_path / 'rotated.jpg'
    (tmp_path / 'bomb.png').write_bytes(png_declaring(20000, 20000))
    files['bomb.png'] = tmp_path / 'bomb.png'
    (tmp_path / 'truncated.jpg').write_bytes((photos / FACE_PEOPLE[0] / '1.jpg').read_bytes()[:2000])
    files['truncated.jpg'] = tmp_path / 'truncated.jpg'
    results = dict(zip(files, embedder(list(files.values()))))
    for name in ('cmyk.jpg', 'palette.png', 'alpha.png', 'gray.png', 'sixteen.png', 'animated.gif', 'rotated.jpg'):
        assert results[name].status == 'ok', (name, results[name])
    for name in ('tiny.png', 'bomb.png', 'truncated.jpg'):
        assert results[name].status == 'error' and results[name].error, name
    loop = tmp_path / 'loop'
    (loop / 'a').mkdir(parents=True)
    (loop / 'a' / 'back').symlink_to(loop)
    (loop / 'a' / 'x.jpg').write_bytes((photos / FACE_PEOPLE[0] / '1.jpg').read_bytes())
    out = json.loads(run_main('timm_mobileone.faces.__main__', 'embed', loop, '--out', tmp_path / 'g.npz', *MODEL,
                              '--no-progress').stdout)
    assert out['photos'] == 1 and out['embedded'] == 1


def test_no_weights_no_embeddings(photos):
    """A model without weights (no checkpoint, Hub name or artifact) is refused: random weights give confident
    cosines of nothing, and two runs (embed, then search) would be two different models."""
    proc = run_main('timm_mobileone.faces.__main__', 'compare', photos / 'noise.png', photos / 'noise.png',
                    '--model', 'mobileone_112_test')
    assert proc.returncode == 2 and 'no weights given' in proc.stderr and proc.stderr.count('\n') == 1


def test_a_model_that_outputs_nan_is_a_photo_error(photos, embedder, monkeypatch):
    monkeypatch.setattr(type(embedder), '_forward', lambda self, x: np.full((len(x), 8), np.nan, np.float32))
    result = embedder([photos / FACE_PEOPLE[0] / '1.jpg'])[0]
    assert result.status == 'error' and 'not finite' in result.error and result.face is None


def test_two_faces_are_counted_as_two(photos, embedder, tmp_path):
    left, right = (cv2.imread(str(photos / FACE_PEOPLE[i] / '1.jpg')) for i in (0, 1))
    cv2.imwrite(str(tmp_path / 'two.jpg'), np.concatenate([left, right], axis=1))
    result = embedder([tmp_path / 'two.jpg'], all_faces=False)[0]
    assert result.status == 'several_faces' and result.to_json()['faces'] == 2 and len(result.faces) == 1


def test_embed_keeps_odd_names_and_redoes_replaced_photos(photos, embedder, tmp_path, monkeypatch):
    """A file name that is not UTF-8 keeps its bytes in the gallery; a photo replaced under its name between an
    interrupted run and its resume is embedded again (its size and time are recorded), not kept stale."""
    import os

    from timm_mobileone.faces.gallery import open_gallery
    src = tmp_path / 'src'
    src.mkdir()
    odd = os.fsdecode(b'odd\xffname.jpg')
    (src / 'b.jpg').write_bytes((photos / FACE_PEOPLE[1] / '1.jpg').read_bytes())
    (src / odd).write_bytes((photos / FACE_PEOPLE[0] / '1.jpg').read_bytes())
    out = tmp_path / 'g.npz'
    argv = ['embed', src, '--out', out, *MODEL, '--no-progress', '-b', '1']
    assert _embed_interrupted_at_second_batch(monkeypatch, argv).returncode == 130  # b.jpg embedded, then Ctrl-C
    (src / 'b.jpg').write_bytes((photos / FACE_PEOPLE[2] / '1.jpg').read_bytes())
    st = (src / 'b.jpg').stat()
    os.utime(src / 'b.jpg', ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # a coarse clock could leave it equal
    assert json.loads(run_main('timm_mobileone.faces.__main__', *argv).stdout)['embedded'] == 2
    g = open_gallery(out)
    assert odd in g.paths
    now = embedder([src / 'b.jpg'])[0].face.embedding
    assert np.allclose(np.asarray(g.embeddings)[g.paths.index('b.jpg')], now, atol=1e-5)
