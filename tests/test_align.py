"""From raw photos to verified pairs: `python -m eval.align`, CFP's own layout and LFW-style photo folders in eval.

The photos are real LFW faces (`lfw_dev` crops, shared data) put back into larger frames by a known similarity
transform (scaled, rotated, shifted, on a textured background), so the right crop is known; the tests skip cleanly
without the shared data. The detector is the YuNet file shipped in timm_mobileone/faces/detectors/.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from timm_mobileone.faces import align as A
from eval import align as align_cli
from eval import cfp, lfw

from helpers import FACE_PEOPLE, LFW_DEV, face_photo, lfw_crop, needs_lfw_dev, run_main

cv2 = pytest.importorskip('cv2')
REPO = Path(__file__).resolve().parents[1]
PEOPLE = FACE_PEOPLE
_crop, _photo = lfw_crop, face_photo


def _similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Pixel correlation of the central 80x80 of two crops."""
    a, b = (x[16:96, 16:96].astype(np.float64).ravel() for x in (a, b))
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


@pytest.fixture(scope='module')
def detector():
    return A.Detector(A.DEFAULT_DETECTOR)


@needs_lfw_dev
def test_photos_align_to_the_same_crop(detector):
    """Detection + the template transform undo a known warp: two photos made from one crop by different warps align
    to the same crop as the crop itself does (lfw_dev's crops are framed tighter than insightface's template, so the
    comparison is with the crop aligned again, not with the file), and a crop shifted by 6 pixels would not."""
    settings = A.AlignSettings(detector_sha256='')
    for i, person in enumerate(PEOPLE):
        crop = _crop(person)
        itself, _ = A.align_photo(cv2.copyMakeBorder(crop, 40, 40, 40, 40, cv2.BORDER_CONSTANT), detector, settings)
        for seed in (i, 100 + i):
            aligned, record = A.align_photo(_photo(crop, seed), detector, settings)
            assert record['served'] == 'detector' and record['faces'] == 1 and aligned.shape == (112, 112, 3)
            same, shifted = _similarity(aligned, itself), _similarity(np.roll(aligned, 6, axis=1), itself)
            assert same > 0.85 and same > shifted + 0.05, (person, seed, same, shifted)


def test_no_face_falls_back_to_the_centre_or_fails(detector):
    noise = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    crop, record = A.align_photo(noise, detector, A.AlignSettings(detector_sha256=''))
    assert record == dict(faces=0, served='center') and crop.shape == (112, 112, 3)
    with pytest.raises(ValueError, match='no face found'):
        A.align_photo(noise, detector, A.AlignSettings(detector_sha256='', fallback=''))
    landmarks = A.ARCFACE_TEMPLATE * 2 + 10  # landmarks the caller knows stand in for the detector's
    crop, record = A.align_photo(noise, detector, A.AlignSettings(detector_sha256=''), landmarks)
    assert record['served'] == 'landmarks'
    np.testing.assert_array_equal(crop, A.align_landmarks(noise, landmarks))


def test_choose_face():
    faces = np.zeros((3, 15), np.float32)
    faces[:, 0:4] = [[0, 0, 50, 50, ], [200, 150, 40, 40], [10, 10, 60, 60]]
    faces[:, 14] = [0.9, 0.95, 0.6]
    assert A.choose_face(faces, (300, 400), 'largest') == 2
    assert A.choose_face(faces, (300, 400), 'score') == 1
    assert A.choose_face(faces, (300, 400), 'area_score') == 0
    assert A.choose_face(faces, (300, 400), 'central') == 1


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    """An LFW-style folder of photos (pairs.txt, <Name>/<Name>_NNNN.jpg) plus files that are not photos."""
    if not (LFW_DEV / 'pairs.txt').is_file():
        pytest.skip(f'{LFW_DEV} not found')
    root = tmp_path_factory.mktemp('photos') / 'src'
    for i, person in enumerate(PEOPLE):
        (root / person).mkdir(parents=True)
        for n in (1, 2):
            if (LFW_DEV / person / f'{person}_{n:04d}.jpg').is_file():
                cv2.imwrite(str(root / person / f'{person}_{n:04d}.jpg'), _photo(_crop(person, n), 10 * i + n))
    lines = ['2 2'] + [f'{p} 1 2' for p in PEOPLE if (root / p / f'{p}_0002.jpg').is_file()][:2]
    lines += [f'{PEOPLE[0]} 1 {PEOPLE[1]} 1', f'{PEOPLE[2]} 1 {PEOPLE[3]} 1']
    (root / 'pairs.txt').write_text('\n'.join(lines) + '\n')
    return root


def _run(capfd, args):
    """`python -m eval.align args` in-process (run_main; the process itself is test_ctrl_c_while_starting_exits_130's
    subject): what it printed, with anything written to the file descriptors themselves (OpenCV's native log, the
    align workers' output) added to its stderr, as a subprocess's would hold it."""
    capfd.readouterr()
    proc = run_main('eval.align', *args, cwd=REPO)
    native = capfd.readouterr()
    proc.stdout += native.out
    proc.stderr += native.err
    return proc


def test_align_cli_resumes_and_reports(photos, tmp_path, capfd):
    src = tmp_path / 'src'
    subprocess.run(['cp', '-r', str(photos), str(src)], check=True)
    (src / 'not_a_photo.jpg').write_bytes(b'hello, not a JPEG')
    whole = (src / PEOPLE[0] / f'{PEOPLE[0]}_0001.jpg').read_bytes()
    (src / 'truncated.jpg').write_bytes(whole[:len(whole) // 2])
    cv2.imwrite(str(src / 'noise.png'), np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    dst = tmp_path / 'dst'
    proc = _run(capfd, [str(src), str(dst), '--align-workers', '2'])  # the spawned pool
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    photos_total = len(align_cli.list_photos(src))
    assert out['photos'] == out['aligned_now'] == photos_total
    assert out['served'] == {'detector': photos_total - 3, 'center': 1, 'error': 2} and out['errors'] == 2
    report = json.loads((dst / 'align_report.json').read_text())
    assert {e['image'] for e in report['errors']} == {'not_a_photo.jpg', 'truncated.jpg'}
    assert 'truncated' in next(e['error'] for e in report['errors'] if e['image'] == 'truncated.jpg')
    assert report['fallbacks'] == [dict(image='noise.png', served='center')]
    assert (dst / 'pairs.txt').read_text() == (src / 'pairs.txt').read_text()
    crop = cv2.imread(str(dst / PEOPLE[1] / f'{PEOPLE[1]}_0001.jpg'))
    assert crop.shape == (112, 112, 3) and not (dst / 'truncated.jpg').exists()
    assert not list(dst.rglob('*.tmp')) and 'Traceback' not in proc.stderr
    # resumed: only what is missing (a deleted crop, the two broken files) runs again
    (dst / PEOPLE[1] / f'{PEOPLE[1]}_0001.jpg').unlink()
    again = json.loads(_run(capfd, [str(src), str(dst), '--align-workers', '1']).stdout)
    assert again['aligned_now'] == 3 and again['served'] == out['served']
    # other settings: refused in one line, nothing touched; --overwrite aligns everything again
    before = (dst / 'align_settings.json').read_text()
    proc = _run(capfd, [str(src), str(dst), '--min-side', '200'])
    assert proc.returncode == 2 and proc.stderr.strip().count('\n') == 0 and 'min_side differ' in proc.stderr
    assert (dst / 'align_settings.json').read_text() == before
    proc = _run(capfd, [str(src), str(dst), '--min-side', '200', '--overwrite', '--align-workers', '1'])
    assert json.loads(proc.stdout)['aligned_now'] == photos_total


@pytest.mark.parametrize('case', ['text', 'onnx', 'missing'])
def test_bad_detector_file(tmp_path, case, capfd):
    (tmp_path / 'src').mkdir()
    cv2.imwrite(str(tmp_path / 'src' / 'a.jpg'), np.zeros((64, 64, 3), np.uint8))
    path = tmp_path / 'det.onnx'
    if case == 'text':
        path.write_text('not a network')
    elif case == 'onnx':
        onnx = pytest.importorskip('onnx')
        from onnx import TensorProto, helper
        graph = helper.make_graph([helper.make_node('Identity', ['input'], ['output'])], 'g',
                                  [helper.make_tensor_value_info('input', TensorProto.FLOAT, [1, 3, 320, 320])],
                                  [helper.make_tensor_value_info('output', TensorProto.FLOAT, [1, 3, 320, 320])])
        onnx.save(helper.make_model(graph), str(path))
    proc = _run(capfd, [str(tmp_path / 'src'), str(tmp_path / 'dst'), '--detector', str(path)])
    assert proc.returncode == 2 and proc.stderr.startswith('error: --detector') and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().count('\n') == 0 and not (tmp_path / 'dst').exists()


@pytest.mark.parametrize('argv, message', [
    (['{src}', '{src}'], 'own folder'),
    (['{src}/nowhere', '{dst}'], 'no such folder'),
    (['{src}', '{dst}', '--score-threshold', '1.5'], '--score-threshold'),
    (['{src}', '{dst}', '--min-side', '700'], '--min-side'),
])
def test_align_cli_bad_flags(tmp_path, capsys, argv, message):
    (tmp_path / 'src').mkdir()
    assert message in _exit_2(capsys, align_cli.main, [a.format(src=tmp_path / 'src', dst=tmp_path / 'dst')
                                                        for a in argv])


def _exit_2(capsys, main, argv) -> str:
    """stderr of a CLI that must exit 2 with one `error:` line and nothing on stdout."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    assert e.value.code == 2 and out.out == '' and out.err.startswith('error: '), out
    assert out.err.strip().count('\n') == 0
    return out.err


def _cfp_root(root: Path, photos: Path) -> Path:
    """A CFP-layout root over the photo fixture: 2 folds of FP and FF, 2 same + 2 different pairs each."""
    images = root / 'Data' / 'Images'
    numbering = {'F': {}, 'P': {}}
    for i, person in enumerate(PEOPLE[:4]):
        for view, n in (('frontal', 1), ('profile', 2)):
            source = photos / person / f'{person}_{n:04d}.jpg'
            if not source.is_file():
                source = photos / person / f'{person}_0001.jpg'
            (images / f'{i + 1:03d}' / view).mkdir(parents=True, exist_ok=True)
            (images / f'{i + 1:03d}' / view / '01.jpg').write_bytes(source.read_bytes())
            key = 'F' if view == 'frontal' else 'P'
            numbering[key][i + 1] = f'../Data/Images/{i + 1:03d}/{view}/01.jpg'
    (root / 'Protocol').mkdir(parents=True)
    for key in 'FP':
        (root / 'Protocol' / f'Pair_list_{key}.txt').write_text(
            ''.join(f'{n} {p}\n' for n, p in numbering[key].items()))
    for protocol in ('FP', 'FF'):
        for fold, (a, b) in enumerate(((1, 2), (3, 4)), start=1):
            d = root / 'Protocol' / 'Split' / protocol / f'{fold:02d}'
            d.mkdir(parents=True)
            (d / 'same.txt').write_text(f'{a},{a}\n{b},{b}\n')
            (d / 'diff.txt').write_text(f'{a},{b}\n{b},{a}\n')
    return root


CFP_COMMON = ['--model', 'mobileone_112_test', '--batch-size', '8', '--workers', '0', '--no-progress',
              '--align-workers', '1']


def test_cfp_raw_photos(photos, tmp_path, capsys):
    root = _cfp_root(tmp_path / 'cfp', photos)
    cache = tmp_path / 'cache'
    result = cfp.main(CFP_COMMON + ['--data', str(root), '--align-cache', str(cache)])
    capsys.readouterr()
    assert [r['dataset'] for r in result['results']] == ['cfp_fp', 'cfp_ff']
    for r in result['results']:
        assert r['num_pairs'] == 8 and r['num_folds'] == 2 and r['folds_from'].startswith('Split/')
        assert len(r['accuracies']) == 2 and r['eer'] is not None and r['auc'] is not None
    folders = list(cache.glob('cfp-*/*'))
    assert len(folders) == 1  # one cache per source and settings, shared by the protocols
    report = json.loads((folders[0] / 'align_report.json').read_text())
    assert report['photos'] == 8 and report['served'] == {'detector': 8}
    # the second run reads the crops; --protocol picks one
    result = cfp.main(CFP_COMMON + ['--data', str(root), '--align-cache', str(cache), '--protocol', 'FP'])
    assert [r['dataset'] for r in result['results']] == ['cfp_fp']
    assert json.loads((folders[0] / 'align_report.json').read_text())['aligned_now'] == 0
    # a photo replaced under Data/Images: its new crop is made and scored, not the cached one
    replaced, other = (root / 'Data/Images' / f'{i:03d}/frontal/01.jpg' for i in (1, 3))
    replaced.write_bytes(other.read_bytes())
    st = replaced.stat()
    os.utime(replaced, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    cfp.main(CFP_COMMON + ['--data', str(root), '--align-cache', str(cache), '--protocol', 'FP'])
    assert json.loads((folders[0] / 'align_report.json').read_text())['aligned_now'] == 1
    crops = folders[0] / 'Data/Images'
    assert (crops / '001/frontal/01.jpg').read_bytes() == (crops / '003/frontal/01.jpg').read_bytes()


@pytest.mark.parametrize('damage, message', [
    (lambda root: (root / 'Protocol/Split/FP/01/same.txt').write_text('1;1\n'), 'same.txt:1: expected "A,B"'),
    (lambda root: (root / 'Protocol/Split/FP/02/diff.txt').write_text('3,9\n4,3\n'), 'image 9 is not in Pair_list_P'),
    (lambda root: (root / 'Data/Images/002/profile/01.jpg').unlink(), 'no such photo'),
    (lambda root: (root / 'Data/Images/003/frontal/01.jpg').write_bytes(b'\xff\xd8\xff\xe0 cut'),
     '1 of 8 photos could not be aligned'),
    (lambda root: (root / 'Protocol/Pair_list_P.txt').unlink(), 'Pair_list_P.txt: no such file'),
])
def test_cfp_broken_protocol(photos, tmp_path, capsys, damage, message):
    root = _cfp_root(tmp_path / 'cfp', photos)
    damage(root)
    err = _exit_2(capsys, cfp.main, CFP_COMMON + ['--data', str(root), '--protocol', 'FP', '--align-cache',
                                                  str(tmp_path / 'cache')])
    assert message in err, err
    assert not list((tmp_path / 'cache').rglob('*.tmp'))


def test_lfw_style_photo_folder(photos, tmp_path, capsys):
    argv = CFP_COMMON + ['--data', str(photos), '--align-cache', str(tmp_path / 'cache')]
    proc = run_main('eval.lfw', *argv, cwd=REPO)
    assert proc.returncode == 2 and 'eval.align' in proc.stderr  # photos are not aligned crops: the hint says how
    result = lfw.main(argv + ['--align'])
    assert result['num_pairs'] == 4 and result['num_folds'] == 2


# ----------------------------------------------------------------------------------------------------------------
# hostile but fair: nothing of the source is ever written, nothing stale is served

def _noise(path: Path, seed: int) -> None:
    """A photo without a face (the centre fallback crops it; `--fallback none` refuses it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, (90, 120, 3), dtype=np.uint8))


def _align(capsys, *argv):
    result = align_cli.main([*map(str, argv), '--align-workers', '1', '--no-progress'])
    capsys.readouterr()
    return result


def _aliasing_case(case: str, tmp: Path, capsys):
    """(src, dst) of one hostile layout, an earlier run's destination where the case needs one."""
    src = tmp / 'out' / 'photos'
    for i, name in enumerate(['a.jpg', 'sub/b.jpg', 'photos/a.jpg']):
        _noise(src / name, i)
    dst = tmp / 'crops'
    if case == 'swapped':  # `eval.align crops photos` after `eval.align photos crops`
        _align(capsys, src, dst)
        return dst, src
    if case == 'parent':  # out/photos -> out: out/photos/photos/a.jpg's crop would replace out/photos/a.jpg
        return src, tmp / 'out'
    if case == 'same':
        return src, src / '.' / 'sub' / '..'
    if case == 'under_a_file':
        (tmp / 'afile').write_text('x')
        return src, tmp / 'afile' / 'crops'
    if case == 'read_only':
        return src, Path('/proc/crops')
    _align(capsys, src, dst)
    if case == 'crop_is_a_folder':
        (dst / 'a.jpg').unlink()
        (dst / 'a.jpg').mkdir()
    elif case == 'records_is_a_folder':
        (dst / A.RECORDS_FILE).unlink()
        (dst / A.RECORDS_FILE).mkdir()
    elif case == 'linked_subfolder':  # dst/sub -> src/sub: its crops would land on the photos
        for p in (dst / 'sub').iterdir():
            p.unlink()
        (dst / 'sub').rmdir()
        (dst / 'sub').symlink_to(src / 'sub')
    return src, dst


@pytest.mark.parametrize('case, message', [
    ('swapped', 'holds files no alignment run wrote'),
    ('parent', 'contains the photos'),
    ('same', 'own folder'),
    ('under_a_file', 'cannot create the folder'),
    ('read_only', 'cannot create the folder'),
    ('crop_is_a_folder', 'a.jpg: exists and is not a plain file'),
    ('records_is_a_folder', 'align_records.jsonl: exists and is not a plain file'),
    ('linked_subfolder', 'lies outside'),
])
def test_align_refuses_a_destination_that_aliases_the_source(tmp_path, capsys, case, message):
    from benchmarks.fuzz_targets import snapshot
    src, dst = _aliasing_case(case, tmp_path, capsys)
    before = snapshot(tmp_path)
    assert message in _exit_2(capsys, align_cli.main, [str(src), str(dst), '--align-workers', '1'])
    assert snapshot(tmp_path) == before  # not one file of the source, or of anything else, written


def test_overwrite_leaves_what_the_new_settings_make(tmp_path, capsys):
    """A photo that now fails, and a photo gone from the source, keep no crop of the earlier run."""
    src, dst = tmp_path / 'photos', tmp_path / 'crops'
    _noise(src / 'noise.png', 0)
    _noise(src / 'gone.jpg', 1)
    assert _align(capsys, src, dst)['served'] == {'center': 2}
    (src / 'gone.jpg').unlink()
    out = _align(capsys, src, dst, '--overwrite', '--fallback', 'none')
    assert out['served'] == {'error': 1} and out['errors'] == 1
    assert sorted(p.name for p in dst.iterdir()) == sorted([A.REPORT_FILE, A.RECORDS_FILE, A.SETTINGS_FILE])


def test_a_replaced_photo_is_aligned_again(tmp_path, capsys):
    """The records hold each source's size and time: a photo replaced under its name gets a new crop on resume
    (eval.cfp's cache is such a folder)."""
    import os
    src, dst = tmp_path / 'photos', tmp_path / 'crops'
    _noise(src / 'a.png', 0)
    _noise(src / 'b.png', 1)
    _align(capsys, src, dst)
    assert (dst / 'a.png').read_bytes() != (dst / 'b.png').read_bytes()
    (src / 'a.png').write_bytes((src / 'b.png').read_bytes())
    st = (src / 'a.png').stat()
    os.utime(src / 'a.png', ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # a coarse clock could leave it equal
    assert _align(capsys, src, dst)['aligned_now'] == 1
    assert (dst / 'a.png').read_bytes() == (dst / 'b.png').read_bytes()
    assert _align(capsys, src, dst)['aligned_now'] == 0


def _png(array: np.ndarray) -> bytes:
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format='PNG')
    return buf.getvalue()


def test_16_bit_photos_decode_by_their_range():
    """A 16-bit grayscale PNG is its top 8 bits (as cv2.imread reads it), not Pillow's clip to white; a float
    image outside [0, 1] has no known range and is refused per photo."""
    import io
    from PIL import Image
    gray = np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint8)
    wide = gray.astype(np.uint16) * 256 + np.random.default_rng(1).integers(0, 256, gray.shape).astype(np.uint16)
    data = _png(wide)
    bgr = A.read_photo(data)
    assert np.array_equal(bgr, A.read_photo(_png(gray)))  # Pillow's convert('RGB') gave 255 almost everywhere
    assert np.array_equal(bgr, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
    buf = io.BytesIO()
    Image.fromarray(wide.astype(np.float32), 'F').save(buf, format='TIFF')
    with pytest.raises(ValueError, match='no known range|only \\[0, 1\\]'):
        A.read_photo(buf.getvalue())


@needs_lfw_dev
def test_16_bit_face_is_aligned_from_the_face(detector):
    gray = cv2.cvtColor(_photo(_crop(PEOPLE[0]), 0), cv2.COLOR_BGR2GRAY)
    settings = A.AlignSettings(detector_sha256='-')
    crop16, record = A.align_photo(A.read_photo(_png(gray.astype(np.uint16) * 257)), detector, settings)
    crop8, _ = A.align_photo(A.read_photo(_png(gray)), detector, settings)
    assert record['served'] == 'detector' and np.array_equal(crop16, crop8)


def test_ctrl_c_while_starting_exits_130(tmp_path):
    """Ctrl-C inside `import torch` (seconds of a command's start): `error: interrupted`, exit 130, like Ctrl-C
    later; a stand-in torch package interrupts itself so the test does not race the real import."""
    fake = tmp_path / 'fake' / 'torch'
    fake.mkdir(parents=True)
    (fake / '__init__.py').write_text('import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)\n')
    (tmp_path / 'photos').mkdir()
    proc = subprocess.run([sys.executable, '-m', 'eval.align', str(tmp_path / 'photos'), str(tmp_path / 'crops')],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, 'PYTHONPATH': str(tmp_path / 'fake')},
                          # as a shell starts it: pytest-xdist's workers ignore SIGINT, and a child inherits that
                          # (Python then leaves SIGINT ignored and the command, rightly, installs no handler)
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 130 and proc.stderr == 'error: interrupted\n' and proc.stdout == ''
    assert not (tmp_path / 'crops').exists()


def test_overwrite_removes_nothing_a_record_leads_out_to(tmp_path, capsys):
    """Records are a file a user can edit: --overwrite removes a recorded crop only where it really lies inside the
    destination (not through a linked folder into the photos), and a records file hard-linked to another file is
    refused before a line is appended to it."""
    import os
    from benchmarks.fuzz_targets import snapshot
    src, dst = tmp_path / 'photos', tmp_path / 'crops'
    _noise(src / 'a.jpg', 0)
    _noise(src / 'sub' / 'b.jpg', 1)
    _align(capsys, src, dst)
    (dst / 'link').symlink_to(src / 'sub')
    with open(dst / A.RECORDS_FILE, 'a') as f:
        f.write(json.dumps(dict(image='link/b.jpg', served='center')) + '\n')
    before = snapshot(src)
    _align(capsys, src, dst, '--overwrite', '--fallback', 'none')
    assert snapshot(src) == before
    notes = tmp_path / 'notes.txt'
    notes.write_text('mine')
    (dst / A.RECORDS_FILE).unlink()
    os.link(notes, dst / A.RECORDS_FILE)
    assert 'hard link' in _exit_2(capsys, align_cli.main, [str(src), str(dst), '--align-workers', '1'])
    assert notes.read_text() == 'mine'
