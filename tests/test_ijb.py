"""eval.ijb: insightface's IJB-B/C protocol number for number, alignment, the CLI on a generated IJB folder."""
import json

import numpy as np
import pytest

cv2 = pytest.importorskip('cv2')

from eval import _ijb as J  # noqa: E402
from eval import ijb  # noqa: E402
from eval.ijb_synthetic import write_synthetic_ijb  # noqa: E402
from helpers import needs_modules  # noqa: E402

pytestmark = needs_modules('skimage', 'sklearn')


# ----------------------------------------------------------------------------------------------------------------
# a transcription of insightface's eval_ijbc.py loops (recognition/arcface_torch, MIT), the reference to match


def ref_image2template_feature(img_feats, templates, medias):
    from sklearn.preprocessing import normalize
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), img_feats.shape[1]))
    for count_template, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face_norm_feats = img_feats[ind_t]
        face_medias = medias[ind_t]
        unique_medias, unique_media_counts = np.unique(face_medias, return_counts=True)
        media_norm_feats = []
        for u, ct in zip(unique_medias, unique_media_counts):
            (ind_m,) = np.where(face_medias == u)
            if ct == 1:
                media_norm_feats += [face_norm_feats[ind_m]]
            else:
                media_norm_feats += [np.mean(face_norm_feats[ind_m], axis=0, keepdims=True)]
        media_norm_feats = np.array(media_norm_feats)
        template_feats[count_template] = np.sum(media_norm_feats, axis=0)
    return normalize(template_feats), unique_templates


def ref_verification(template_norm_feats, unique_templates, p1, p2):
    template2id = np.zeros((max(unique_templates) + 1, 1), dtype=int)
    for count_template, uqt in enumerate(unique_templates):
        template2id[uqt] = count_template
    score = np.zeros((len(p1),))
    total_pairs = np.array(range(len(p1)))
    batchsize = 100000
    for s in [total_pairs[i:i + batchsize] for i in range(0, len(p1), batchsize)]:
        feat1 = template_norm_feats[template2id[p1[s]]]
        feat2 = template_norm_feats[template2id[p2[s]]]
        score[s] = np.sum(feat1 * feat2, -1).flatten()
    return score


def ref_tpr_at_fpr(label, score):
    from sklearn.metrics import roc_curve
    x_labels = [10 ** -6, 10 ** -5, 10 ** -4, 10 ** -3, 10 ** -2, 10 ** -1]
    fpr, tpr, _ = roc_curve(label, score)
    fpr = np.flipud(fpr)
    tpr = np.flipud(tpr)
    row = []
    for fpr_iter in np.arange(len(x_labels)):
        _, min_index = min(list(zip(abs(fpr - x_labels[fpr_iter]), range(len(fpr)))))
        row.append(tpr[min_index])
    return row


def ref_pipeline(img_feats_2d, faceness, templates, medias, p1, p2, label, flip=True, norm_score=True,
                 detector=True):
    """insightface's steps 3-5 on its (N, 2D) feature matrix (image features, then flipped, concatenated)."""
    if flip:
        feats = img_feats_2d[:, 0:img_feats_2d.shape[1] // 2] + img_feats_2d[:, img_feats_2d.shape[1] // 2:]
    else:
        feats = img_feats_2d[:, 0:img_feats_2d.shape[1] // 2]
    if not norm_score:
        feats = feats / np.sqrt(np.sum(feats ** 2, -1, keepdims=True))
    if detector:
        feats = feats * faceness[:, np.newaxis]
    tfeats, uniq = ref_image2template_feature(feats, templates, medias)
    score = ref_verification(tfeats, uniq, p1, p2)
    return score, ref_tpr_at_fpr(label, score)


# ----------------------------------------------------------------------------------------------------------------
# the protocol on known features


def _known_features(seed=0, num_images=240, dim=16):
    """Images with templates (ids with gaps), media holding one and several images, a media id shared by two
    templates, features of widely varying norms, faceness scores, and pairs of every kind."""
    rng = np.random.default_rng(seed)
    templates = np.sort(rng.choice(np.arange(1, 400, 3), size=num_images))
    medias = rng.integers(0, 12, size=num_images) + 1000
    order = rng.permutation(num_images)  # images of a template need not be contiguous in the file
    templates, medias = templates[order], medias[order]
    feats = (rng.standard_normal((num_images, 2 * dim)) * rng.uniform(0.1, 50, (num_images, 1))).astype(np.float32)
    faceness = rng.uniform(0.2, 1.0, num_images).astype(np.float32)
    uniq = np.unique(templates)
    p1 = rng.choice(uniq, 3000)
    p2 = rng.choice(uniq, 3000)
    label = (rng.random(3000) < 0.3).astype(np.int64)
    return feats, faceness, templates, medias, p1, p2, label


@pytest.mark.parametrize('flip, norm_score, detector', [(True, True, True), (False, True, True),
                                                        (True, False, True), (True, True, False)])
def test_pooling_scores_and_tar_equal_insightface_bit_for_bit(flip, norm_score, detector):
    feats, faceness, templates, medias, p1, p2, label = _known_features()
    assert (np.unique(np.stack([templates, medias]), axis=1, return_counts=True)[1] > 1).any()  # several images
    assert (np.unique(np.stack([templates, medias]), axis=1, return_counts=True)[1] == 1).any()  # and one
    ref_score, ref_tar = ref_pipeline(feats, faceness, templates, medias, p1, p2, label, flip, norm_score, detector)

    dim = feats.shape[1] // 2
    pooler = J.TemplatePooler(templates, medias)
    for s in range(0, len(feats), 37):  # in uneven batches, as the loader delivers them
        chunk = feats[s:s + 37]
        pooler.add(s, J.image_features(chunk[:, :dim], chunk[:, dim:] if flip else None,
                                       faceness[s:s + 37] if detector else None, normalize=not norm_score))
    score = J.pair_scores(pooler.template_features(), pooler.unique_templates, p1, p2, chunk=1000)
    np.testing.assert_array_equal(score, ref_score)
    metrics = J.tar_at_far(label, score)
    assert [metrics['tar_at_far'][J.far_key(f)] for f in J.FARS] == ref_tar


def test_far_search_takes_the_first_of_tied_points_in_reversed_order():
    # fpr 0.1 is reached at two thresholds with different tpr (a vertical ROC step): insightface's reversed search
    # must land on the larger tpr, and equal distances on both sides of a FAR go to the first in reversed order
    label = np.array([0] * 10 + [1] * 10)
    score = np.array([0.9] + [0.1] * 9 + [0.95, 0.9, 0.9, 0.8, 0.8, 0.8, 0.2, 0.05, 0.05, 0.05])
    metrics = J.tar_at_far(label, score, fars=(1e-1, 5e-2, 1e-6, 1.0))
    from sklearn.metrics import roc_curve
    fpr, tpr, _ = roc_curve(label, score)
    fpr, tpr = fpr[::-1], tpr[::-1]
    for far in (1e-1, 5e-2, 1e-6, 1.0):
        _, i = min(zip(abs(fpr - far), range(len(fpr))))
        assert metrics['tar_at_far'][J.far_key(far)] == tpr[i]
    assert list(np.round(fpr, 3)).count(0.1) >= 2  # the tie is really there
    assert metrics['tar_at_far']['1e-1'] == max(t for f, t in zip(fpr, tpr) if abs(f - 0.1) < 1e-12)


def test_pooler_refuses_images_out_of_order():
    pooler = J.TemplatePooler(np.array([1, 1, 2]), np.array([5, 5, 6]))
    pooler.add(0, np.ones((1, 4), np.float32))
    with pytest.raises(ValueError, match='in order'):
        pooler.add(2, np.ones((1, 4), np.float32))


# ----------------------------------------------------------------------------------------------------------------
# alignment


@pytest.fixture(scope='module')
def ijb_root(tmp_path_factory):
    out = tmp_path_factory.mktemp('ijb')
    info = write_synthetic_ijb(out, 'IJBC', identities=14, templates_per_identity=3, seed=3)
    assert 150 <= info['images'] <= 400
    return out


def test_alignment_is_skimage_plus_opencv_and_recovers_the_face(ijb_root):
    from skimage.transform import SimilarityTransform
    meta = J.read_meta(ijb_root, 'IJBC')
    for i in (0, 7, len(meta.names) - 1):
        bgr = cv2.imread(str(meta.image_dir / meta.names[i]))
        tform = SimilarityTransform.from_estimate(meta.landmarks[i], J.ARCFACE_TEMPLATE)
        want = cv2.cvtColor(cv2.warpAffine(bgr, tform.params[0:2, :], (112, 112), borderValue=0.0),
                            cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(J.align(bgr, meta.landmarks[i]), want)
    # images of one media are one pattern: aligned, two of them agree far better than two identities do
    crops = [J.align(cv2.imread(str(meta.image_dir / n)), lmk).astype(np.float32)
             for n, lmk in zip(meta.names[:2], meta.landmarks[:2])]
    other = next(i for i, t in enumerate(meta.templates) if meta.templates[0] != t and i > 20)
    far = J.align(cv2.imread(str(meta.image_dir / meta.names[other])), meta.landmarks[other]).astype(np.float32)
    assert np.abs(crops[0] - crops[1]).mean() * 2 < np.abs(crops[0] - far).mean()


def test_alignment_keeps_colour_order(tmp_path):
    # a red face in an RGB sense, written by OpenCV (BGR): the aligned crop is red in RGB, as insightface feeds it
    bgr = np.zeros((160, 160, 3), np.uint8)
    bgr[..., 2] = 200
    lmk = J.ARCFACE_TEMPLATE + 20
    crop = J.align(bgr, lmk)
    assert crop.shape == (112, 112, 3) and crop[56, 56].tolist() == [200, 0, 0]
    assert J.align(bgr, np.zeros((5, 2), np.float32)) is None  # degenerate landmarks


# ----------------------------------------------------------------------------------------------------------------
# the CLI, end to end


@pytest.fixture(scope='module')
def ijb_run(ijb_root, tmp_path_factory):
    out = tmp_path_factory.mktemp('ijb_run')
    feats = out / 'feats.npy'
    result = ijb.main(['--data-dir', str(ijb_root), '--save-features', str(feats), '--batch-size', '48',
                       '--workers', '0', '--plot', str(out / 'roc.png'), '--results-file', str(out / 'ijbc.json')])
    return result, feats, out


def test_cli_gives_the_transcription_numbers(ijb_root, ijb_run):
    result, feats_path, out = ijb_run
    meta = J.read_meta(ijb_root, 'IJBC')
    feats = np.load(feats_path)
    assert feats.shape == (len(meta.names), 2, 512) and feats.dtype == np.float32
    _, ref_tar = ref_pipeline(feats.reshape(len(feats), -1), meta.faceness, meta.templates, meta.medias, meta.p1,
                              meta.p2, meta.label)
    assert [result['tar_at_far'][J.far_key(f)] for f in J.FARS] == ref_tar
    assert result['num_images'] == len(meta.names) and result['num_pairs'] == len(meta.label)
    assert result['num_templates'] == len(np.unique(meta.templates))
    assert result['flip'] and result['detector_score'] and result['norm_score'] and result['reparam']
    assert result['images_per_second'] > 0 and 0 < result['auc'] <= 1
    assert json.loads((out / 'ijbc.json').read_text())['tar_at_far'] == result['tar_at_far']
    from timm_mobileone import results
    row, = results.read(str(out / 'ijbc.json'))['rows']
    assert row['kind'] == 'ijb' and row['dataset'] == 'ijbc' and row['tar_at_far'] == result['tar_at_far']
    assert (out / 'roc.png').stat().st_size > 1000


def test_features_rescore_and_modes_match_the_transcription(ijb_root, ijb_run, capsys):
    result, feats_path, out = ijb_run
    meta = J.read_meta(ijb_root, 'IJBC')
    again = ijb.main(['--data-dir', str(ijb_root), '--features', str(feats_path)])
    assert again['tar_at_far'] == result['tar_at_far'] and again['auc'] == result['auc']
    feats = np.load(feats_path).reshape(len(meta.names), -1)
    # the other modes, and the faceness scores from a file where the landmark file is absent
    faceness = out / 'faceness.npy'
    np.save(faceness, meta.faceness)
    flat = out / 'noflip.npy'
    np.save(flat, np.load(feats_path)[:, 0])
    for flags, kw in [(['--no-detector-score'], dict(detector=False)),
                      (['--normalize-before-pooling', '--faceness', str(faceness)], dict(norm_score=False)),
                      (['--no-flip', '--features', str(flat)], dict(flip=False))]:
        if '--features' not in flags:
            flags = flags + ['--features', str(feats_path)]
        got = ijb.main(['--data-dir', str(ijb_root), *flags])
        _, ref_tar = ref_pipeline(feats, meta.faceness, meta.templates, meta.medias, meta.p1, meta.p2, meta.label,
                                  **kw)
        assert [got['tar_at_far'][J.far_key(f)] for f in J.FARS] == ref_tar, flags
    capsys.readouterr()


def _copy_root(src, dst):
    import shutil
    shutil.copytree(src / 'IJBC', dst / 'IJBC')
    return dst


def _exit2(argv, capsys, match):
    with pytest.raises(SystemExit) as e:
        ijb.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(('error: ', 'python -m eval.ijb: error: ')) and match in err[-1], err
    assert not any('Traceback' in line for line in err)


def test_bad_inputs_exit_2_with_one_line(ijb_root, ijb_run, tmp_path, capsys):
    _, feats_path, _ = ijb_run
    root = _copy_root(ijb_root, tmp_path / 'a')
    meta_dir = root / 'IJBC' / 'meta'
    base = ['--data-dir', str(root), '--features', str(feats_path)]
    # a features file of the wrong shape; (N, D) without --no-flip
    bad = tmp_path / 'bad.npy'
    np.save(bad, np.zeros((3, 2, 8), np.float32))
    _exit2(['--data-dir', str(root), '--features', str(bad)], capsys, 'shape (3, 2, 8)')
    np.save(bad, np.load(feats_path)[:, 0])
    _exit2(['--data-dir', str(root), '--features', str(bad)], capsys, '--no-flip')
    # a line with the wrong number of fields names the file and the line
    pairs = meta_dir / 'ijbc_template_pair_label.txt'
    lines = pairs.read_text().splitlines()
    pairs.write_text('\n'.join(lines[:4] + ['12 13'] + lines[4:]) + '\n')
    _exit2(base, capsys, 'ijbc_template_pair_label.txt:5: expected 3 fields')
    # a template in the pair list without images
    pairs.write_text('\n'.join(lines + ['999999 %s 0' % lines[0].split()[0]]) + '\n')
    _exit2(base, capsys, 'template 999999 has no images')
    pairs.write_text('\n'.join(lines) + '\n')
    tid = meta_dir / 'ijbc_face_tid_mid.txt'
    tid_text = tid.read_text()
    tid.write_text(tid_text.replace('\n', ' x\n', 1))
    _exit2(base, capsys, 'ijbc_face_tid_mid.txt:1: expected 3 fields')
    tid.write_text(tid_text)
    # a listed image that is absent, before any model runs
    (root / 'IJBC' / 'loose_crop' / '5.jpg').unlink()
    _exit2(['--data-dir', str(root)], capsys, '5.jpg: no such file')
    # a missing meta file is named; without the landmark file --features needs --faceness or --no-detector-score
    (meta_dir / 'ijbc_name_5pts_score.txt').unlink()
    _exit2(base, capsys, 'ijbc_name_5pts_score.txt: no such file')
    (meta_dir / 'ijbc_template_pair_label.txt').unlink()
    _exit2(base + ['--no-detector-score'], capsys, 'ijbc_template_pair_label.txt: no such file')
    _exit2(['--data-dir', str(tmp_path)], capsys, 'no IJBC/meta folder')
