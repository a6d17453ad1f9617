"""train.face --teacher (train/distill.py) and train.split: a real distillation run on generated identities with a
random-weight MobileFaceNet teacher, its target cache (reused, and refused when stale), resume after an
interrupt, the hub export of a 128-d student loaded back, and the bad-input contract."""
import json
import math
import shlex
from pathlib import Path

import pytest
import torch

from train import face, step
from train.distill import DistillHead

from train.synthetic import identity_images, make_pack, write_image_folder
from helpers import face_error, interrupt_then_resume


def _save_teacher(path: Path, seed: int) -> Path:
    import timm
    from safetensors.torch import save_file
    import timm_mobileone  # noqa: F401
    torch.manual_seed(seed)
    model = timm.create_model('mobilefacenet')
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('distill')
    data = write_image_folder(root / 'faces', identity_images(4, 6, seed=5))
    return dict(root=root, data=data, val=make_pack(root / 'val.bin', num_pairs=10),
                teacher=_save_teacher(root / 'teacher.safetensors', 0))


def _flags(setup, out, *extra):
    return ['--model', 'mobileone_112_test', '--model-kwargs', 'embed_dim=128', '--data', str(setup['data']),
            '--loss', 'none', '--teacher', 'mobilefacenet', '--teacher-checkpoint', str(setup['teacher']),
            '--output', str(out), '--epochs', '2', '-b', '8', '--lr', '0.01', '--warmup-epochs', '0.5', '-j', '0',
            '--log-interval', '1', '--seed', '7', *extra]


def _losses(out: Path):
    rows = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    return {r['step']: r['loss'] for r in rows if 'loss' in r}


@pytest.fixture(scope='module')
def run(setup):
    out = setup['root'] / 'run'
    summary = face.main(_flags(setup, out, '--val', str(setup['val']), '--checkpoint-every', '2', '--tag',
                               'synthetic_distill'))  # --license: other by default with a teacher
    return out, summary


def test_distilled_student_exports_and_loads_back_at_the_teachers_size(run):
    import timm
    import timm_mobileone  # noqa: F401
    from safetensors import safe_open
    from safetensors.torch import load_file
    out, summary = run
    assert summary['teacher']['computed'] and summary['teacher']['teacher']['model'] == 'mobilefacenet'
    with safe_open(str(out / 'teacher.safetensors'), 'pt') as f:
        assert f.get_tensor('targets').shape == (24, 128) and f.get_tensor('targets').dtype == torch.float16
        norms = f.get_tensor('targets_flip').float().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(24), atol=2e-3, rtol=0)
    losses = _losses(out)
    assert len(losses) == 6 and all(0 <= v <= 2 for v in losses.values())  # 1 - cosine
    # best.json's command reproduces the validation from the weights alone (embed_dim read off the weights)
    from eval import verify
    best = json.loads((out / 'best.json').read_text())
    again = verify.main(shlex.split(best['command'])[3:])
    assert again['results'][0]['accuracies'] == best['results'][0]['accuracies']
    hub = out / 'hub'
    card = (hub / 'README.md').read_text()
    assert 'distillation from the teacher `mobilefacenet`' in card and "licence terms carry over" in card
    assert 'license: other' in card and summary['export']['tag'] == 'synthetic_distill'
    ref = timm.create_model('mobileone_112_test', embed_dim=128)
    ref.load_state_dict(load_file(str(out / 'best.safetensors')))
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loaded = timm.create_model(f'local-dir:{hub}', pretrained=True).eval()(x)
        assert loaded.shape == (2, 128) and torch.equal(loaded, ref.eval()(x))


def test_interrupt_then_resume_matches_and_the_cache_is_reused(setup, run, monkeypatch):
    out_a, _ = run
    out = setup['root'] / 'resumed'
    flags = _flags(setup, out, '--teacher-cache', str(out_a / 'teacher.safetensors'), '--checkpoint-every', '2',
                   '--no-export')
    summary = interrupt_then_resume(monkeypatch, flags)
    assert summary['teacher']['computed'] is False and summary['steps'] == 6
    a, b = _losses(out_a), _losses(out)
    assert sorted(b) == list(range(1, 7))
    for s in range(1, 7):
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), s


def test_a_stale_cache_is_refused_and_kept(setup, run, tmp_path, capsys):
    cache = run[0] / 'teacher.safetensors'
    before = cache.read_bytes()
    other = _save_teacher(tmp_path / 'other.safetensors', 1)
    argv = _flags(setup, tmp_path / 'a', '--teacher-cache', str(cache), '--no-export')
    argv[argv.index(str(setup['teacher']))] = str(other)
    assert 'computed for another teacher' in face_error(capsys, argv)
    fewer = write_image_folder(tmp_path / 'fewer', identity_images(4, 6, seed=5)[:-1])
    argv = _flags(setup, tmp_path / 'b', '--teacher-cache', str(cache), '--no-export')
    argv[argv.index(str(setup['data']))] = str(fewer)
    assert 'computed for other training data' in face_error(capsys, argv)
    assert 'not a teacher-target cache' in face_error(capsys, _flags(setup, tmp_path / 'c', '--teacher-cache',
                                                                 str(setup['teacher']), '--no-export'))
    assert cache.read_bytes() == before


def test_what_distillation_refuses(setup, tmp_path, capsys):
    argv = _flags(setup, tmp_path / 'a', '--no-export')
    argv[argv.index('embed_dim=128')] = 'head_type=gdc'  # the default 512-d student
    line = face_error(capsys, argv)
    assert 'embeds 128-d, the student 512-d' in line and 'embed_dim=128' in line and '--distill-proj' in line
    import timm
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in timm.create_model('test_resnet').state_dict().items()},
              str(tmp_path / 'resnet.safetensors'))  # a teacher always has weights (a random one is refused)
    argv = _flags(setup, tmp_path / 'b', '--no-export')
    argv[argv.index('mobilefacenet')] = 'test_resnet'
    argv[argv.index(str(setup['teacher']))] = str(tmp_path / 'resnet.safetensors')
    assert 'takes 160x160 images, the student 112x112' in face_error(capsys, argv)
    assert not (tmp_path / 'b').exists()
    argv = _flags(setup, tmp_path / 'd', '--no-export')
    argv[argv.index(str(setup['teacher']))] = str(tmp_path / 'missing.safetensors')
    line = face_error(capsys, argv)
    assert line.startswith('error: --teacher mobilefacenet: ') and 'missing.safetensors' in line
    with pytest.raises(SystemExit) as e:
        face.main(['--data', str(setup['data']), '--output', str(tmp_path / 'c'), '--loss', 'none'])
    assert e.value.code == 2 and '--loss none' in capsys.readouterr().err


def test_projection_margin_and_feature_hint_beside_distillation(setup, tmp_path):
    """--distill-proj lets a 512-d student learn a 128-d teacher; --loss arcface adds the margin loss on labels;
    --hint-weight adds the feature-map hint through a 1x1 conv, and the teacher's weights stay out of checkpoints."""
    summary = face.main(_flags(setup, tmp_path / 'p', '--no-export', '--epochs', '1', '--loss', 'arcface',
                               '--distill-proj', '--model-kwargs', 'embed_dim=512', '--hint-weight', '1'))
    assert summary['steps'] == 3 and summary['head']['classes_per_process'] == 4
    from safetensors.torch import load_file
    state = load_file(str(tmp_path / 'p' / 'checkpoint-00000003.safetensors'))
    assert state['head.proj.weight'].shape == (128, 512) and state['head.margin.weight'].shape == (4, 512)
    assert state['head.hint.weight'].shape == (512, 128, 1, 1)  # the student's last map (128) to the teacher's (512)
    assert sorted({k.split('.')[0] for k in state} - {'model', 'head', 'rng'}) == ['optimizer']
    assert not [k for k in state if k.startswith('head.') and k.split('.')[1] not in ('proj', 'margin', 'hint')]
    assert all(math.isfinite(v) and v > 0 for v in _losses(tmp_path / 'p').values())


def test_distill_head_picks_the_target_of_the_orientation_seen():
    targets = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    flipped = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    head = DistillHead(8, targets, flipped)
    labels = torch.tensor([[0, 3, 0], [0, 1, 1]])
    seen = torch.stack([targets[3], flipped[1]]) * 4.0  # the norm does not matter, the direction does
    assert head.loss(seen, labels).item() == pytest.approx(0.0, abs=1e-6)
    assert head.loss(seen, torch.tensor([[0, 3, 1], [0, 1, 0]])).item() > 0.1


# ----------------------------------------------------------------------------------------------------------------
# consistent teaching: the teacher online on the augmented batch (train/augment.py)

AUGMENTED = ('--crop-scale', '0.8', '1', '--rotate', '8', '--color-jitter', '0.3', '--grayscale-prob', '0.3',
             '--gaussian-blur-prob', '0.3', '--mixup', '0.5', '--cutmix', '1', '--relational-weight', '0.5',
             '--model-ema', '--model-ema-decay', '0.9', '--model-ema-warmup')


def test_online_teacher_without_augmentation_trains_as_the_cached_targets(setup, run, tmp_path):
    """--teacher-mode online on plain flipped crops: the same losses as the cached targets (float16 rounding);
    --preload feeds the same batches (order and flips) as the DataLoader."""
    summary = face.main(_flags(setup, tmp_path / 'on', '--teacher-mode', 'online', '--no-export', '--preload'))
    assert summary['teacher']['mode'] == 'online' and not (tmp_path / 'on' / 'teacher.safetensors').exists()
    a, b = _losses(run[0]), _losses(tmp_path / 'on')
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=2e-3, abs=1e-4), s


def test_online_teacher_serves_the_feature_hint_from_the_same_forward(setup, run, tmp_path, monkeypatch):
    """--hint-weight with the teacher online: one teacher forward per step gives both the embedding target and the
    feature map, and the run trains as the cached targets with the hint do (float16 rounding of the cache)."""
    from timm_mobileone.models.mobilefacenet import MobileFaceNet
    calls = []
    features = MobileFaceNet.forward_features
    monkeypatch.setattr(MobileFaceNet, 'forward_features', lambda self, x: calls.append(len(x)) or features(self, x))
    flags = ('--no-export', '--epochs', '1', '--hint-weight', '1')
    face.main(_flags(setup, tmp_path / 'cached', '--teacher-mode', 'cached', *flags))
    calls.clear()
    summary = face.main(_flags(setup, tmp_path / 'online', '--teacher-mode', 'online', *flags))
    assert summary['teacher']['mode'] == 'online' and summary['steps'] == 3
    assert calls.count(8) == 3 and len(calls) == 5  # one forward per step of 8 images, besides 2 shape probes
    a, b = _losses(tmp_path / 'cached'), _losses(tmp_path / 'online')
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=2e-3, abs=1e-4), s


@pytest.fixture(scope='module')
def augmented(setup):
    """An augmented run with the teacher online, mixing, the relational term, EMA and unlabeled extra faces."""
    extra = write_image_folder(setup['root'] / 'extra', identity_images(2, 4, seed=11))
    flags = _flags(setup, setup['root'] / 'aug', '--no-export', '--checkpoint-every', '2', '--val',
                   str(setup['val']), '--best-on', 'val', '--extra-data', str(extra), *AUGMENTED)
    return flags, face.main(flags)


def test_augmented_run_resumes_exactly_and_keeps_curve_best_and_final(setup, augmented, monkeypatch):
    from safetensors.torch import load_file
    flags, summary = augmented
    out = Path(flags[flags.index('--output') + 1])
    assert summary['teacher']['mode'] == 'online' and summary['num_images'] == 24 + 8 and summary['steps'] == 8
    assert summary['augment']['mixup'] == 0.5 and [r['step'] for r in summary['val_curve']] == [4, 8]
    assert summary['best']['best_on'] == 'val'
    assert (out / 'best.safetensors').is_file() and (out / 'final.safetensors').is_file()
    final = load_file(str(out / 'final.safetensors'))
    ema = load_file(str(out / 'checkpoint-00000008.safetensors'))
    assert all(torch.equal(final[k], ema[f'ema.{k}']) for k in final)  # the EMA weights are the final ones
    resumed = setup['root'] / 'aug-resumed'
    again = flags + ['--preload']  # the preloaded batches are the DataLoader's, mid-epoch resume included
    again[again.index('--output') + 1] = str(resumed)
    summary_b = interrupt_then_resume(monkeypatch, again, at_step=3)
    a, b = _losses(out), _losses(resumed)
    assert sorted(b) == list(range(1, 9))
    for s in a:  # the augmentation, the mixing partners and lambdas included
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), s
    assert [r['step'] for r in summary_b['val_curve']] == [4, 8]


def test_what_consistent_teaching_refuses(setup, augmented, tmp_path, capsys):
    from eval.api import ArtifactModel
    from timm_mobileone.errors import UserError
    from train.distill import OnlineTeacher
    base = _flags(setup, tmp_path / 'x', '--no-export')
    for extra, msg in ((['--crop-scale', '0', '1'], 'need 0 < LO <= HI <= 1'),
                       (['--crop-scale', '0.5', '1.2'], 'need 0 < LO <= HI <= 1'),
                       (['--mixup', '-0.2'], '--mixup must be >= 0'),
                       (['--grayscale-prob', '2'], '--grayscale-prob must be in [0, 1]'),
                       (['--mixup', '0.2', '--loss', 'arcface'], 'need --teacher and --loss none'),
                       (['--rotate', '5', '--teacher-mode', 'cached'], 'needs --teacher-mode online'),
                       (['--extra-data', str(setup['data']), '--loss', 'arcface'], 'they need --loss none'),
                       (['--extra-data', str(tmp_path / 'nowhere')], 'no such folder')):
        assert msg in face_error(capsys, base + extra), extra
    assert not (tmp_path / 'x').exists()
    assert "--best-on lfw: not one of the --val sets (val)" in face_error(
        capsys, _flags(setup, tmp_path / 'y', '--no-export', '--val', str(setup['val']), '--best-on', 'lfw'))
    flags, _ = augmented
    out = Path(flags[flags.index('--output') + 1])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    changed = flags + ['--resume']
    changed[changed.index('--rotate') + 1] = '12'
    line = face_error(capsys, changed)
    assert 'was started with rotate=8.0, now rotate=12.0' in line
    assert 'model_ema_warmup=True, now model_ema_warmup=False' in face_error(  # the EMA's decay follows the step
        capsys, [f for f in flags if f != '--model-ema-warmup'] + ['--resume'])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    args = face.parse_args(base + ['--teacher-mode', 'online'])
    with pytest.raises(UserError, match='ONNX teachers run on ONNX Runtime\'s CPU provider'):
        OnlineTeacher(ArtifactModel.__new__(ArtifactModel), {}, args, torch.device('cuda'))


# ----------------------------------------------------------------------------------------------------------------
# train.split


def _lfw_folder(root: Path) -> Path:
    """Two LFW-style folds of 2 same + 2 different pairs over 10 people (A..J), plus K who is in no pair."""
    from PIL import Image
    names = [f'P{c}' for c in 'ABCDEFGHIJK']
    for n in names:
        (root / n).mkdir(parents=True)
        for i in (1, 2):
            Image.new('RGB', (112, 112)).save(root / n / f'{n}_{i:04d}.jpg')
    lines = ['2 2', 'PA 1 2', 'PB 1 2', 'PC 1 PD 1', 'PC 2 PE 1',
             'PF 1 2', 'PG 1 2', 'PH 1 PI 1', 'PJ 1 PH 2']
    (root / 'pairs.txt').write_text('\n'.join(lines) + '\n')
    return root


def test_split_is_person_disjoint_with_balanced_validation_folds(tmp_path, capsys):
    from timm_mobileone.verification_data import load_verification_set
    from train import split
    src = _lfw_folder(tmp_path / 'lfw')
    result = split.main(['--data', str(src), '--val-folds', '2', '--val-subfolds', '2', '--output',
                         str(tmp_path / 'out')])
    train = {p.name for p in (tmp_path / 'out' / 'train').iterdir()}
    assert train == {'PA', 'PB', 'PC', 'PD', 'PE', 'PK'} and result['train_images'] == 12
    assert (tmp_path / 'out' / 'val' / 'pairs.txt').read_text().splitlines() == [
        '2 1', 'PF 1 2', 'PH 1 PI 1', 'PG 1 2', 'PJ 1 PH 2']
    val = load_verification_set(tmp_path / 'out' / 'val')
    assert val.folds == 2 and list(val.issame) == [True, False, True, False]
    for argv, msg in ((['--val-folds', '3'], 'pairs.txt has folds 1..2'),
                      (['--val-folds', '1', '2'], 'no person is left'),
                      (['--val-folds', '1', '--val-subfolds', '3'], 'must be >= 2 and divide')):
        with pytest.raises(SystemExit):
            split.main(['--data', str(src), '--output', str(tmp_path / 'x'), *argv])
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an existing non-empty output is never written into
        split.main(['--data', str(src), '--val-folds', '1', '--val-subfolds', '2', '--output', str(tmp_path / 'out')])
    assert 'not empty' in capsys.readouterr().err and not (tmp_path / 'x').exists()


def test_onnx_teacher_gives_the_torch_teachers_targets(setup, tmp_path):
    """--teacher-onnx: the same targets as the model it was exported from (eval's ONNX runner, the cfg's input)."""
    import argparse
    import timm
    from timm_mobileone.checkpoints import create_model_checked
    from timm_mobileone.deploy.formats import export_onnx
    from train.data import open_dataset
    from train.distill import teacher_targets
    fused = timm.utils.reparameterize_model(create_model_checked('mobilefacenet',
                                                                 checkpoint=str(setup['teacher'])).eval())
    export_onnx(fused, str(tmp_path / 't.onnx'))
    dataset = open_dataset(setup['data'], (112, 112))
    common = dict(teacher='mobilefacenet', val_batch_size=8, workers=0, device='cpu', teacher_raw_pixels=False)
    torch_t, torch_f, _ = teacher_targets(dataset, argparse.Namespace(
        teacher_checkpoint=str(setup['teacher']), teacher_onnx='', **common), tmp_path / 'a.safetensors', (112, 112))
    onnx_t, onnx_f, info = teacher_targets(dataset, argparse.Namespace(
        teacher_checkpoint='', teacher_onnx=str(tmp_path / 't.onnx'), **common), tmp_path / 'b.safetensors',
        (112, 112))
    assert info['teacher']['files'].keys() == {'onnx'}
    for a, b in ((torch_t, onnx_t), (torch_f, onnx_f)):
        assert (a.float() * b.float()).sum(1).min().item() > 0.999
    assert (torch_t.float() * torch_f.float()).sum(1).max().item() < 0.999  # the flip is another target


def test_data_fingerprint_follows_the_pack(tmp_path):
    from train.synthetic import write_rec_pack
    from train.data import open_dataset
    from train.distill import data_fingerprint
    samples = identity_images(3, 2, seed=1)
    a = data_fingerprint(open_dataset(write_rec_pack(tmp_path / 'a', samples), (112, 112)))
    assert a == data_fingerprint(open_dataset(write_rec_pack(tmp_path / 'b', samples), (112, 112)))
    changed = samples[:-1] + [(samples[-1][0], identity_images(3, 2, seed=2)[-1][1])]
    assert a != data_fingerprint(open_dataset(write_rec_pack(tmp_path / 'c', changed), (112, 112)))


def test_divergence_is_recorded_in_the_run_for_compare_blocks(setup, tmp_path, monkeypatch, capsys):
    """A non-finite loss stops train.face (one line, exit 2) and leaves a `diverged` row in log.jsonl, which
    train.compare_blocks reads (a result to count, not a failure to grep for)."""
    from train.compare_report import trainability
    from train.compare_runs import diverged_at
    forward, calls = step.FaceTrainModel.forward, []

    def nan_at_step_2(self, images, labels, *teacher):
        calls.append(1)
        loss = forward(self, images, labels, *teacher)
        return loss * float('nan') if len(calls) == 2 else loss
    monkeypatch.setattr(step.FaceTrainModel, 'forward', nan_at_step_2)
    out = tmp_path / 'nan'
    line = face_error(capsys, _flags(setup, out, '--no-export', '--epochs', '1'))
    assert 'loss is nan at step 1' in line
    assert diverged_at(out) == 'loss is nan at step 1'
    rows = [json.loads(x) for x in (out / 'log.jsonl').read_text().splitlines()]
    assert trainability(dict(rows=rows))['first_loss'] == rows[0]['loss']


def test_compare_blocks_measures_each_students_agreement_with_its_teacher(setup, run):
    """compare_blocks' teacher agreement: the per-image cosine of student and teacher on the validation crops."""
    from train.compare_measure import teacher_agreement
    from train.compare_runs import read_run
    out, _ = run
    student = dict(read_run(out), diverged=False)
    teacher_agreement([student], [('mobileone_112_test', {'embed_dim': 128})], [student['model']],
                      [str(setup['val'])], 'cpu')
    agree = student['teacher_agreement']
    assert agree['images'] == 20 and -1 <= agree['cosine_p05'] <= agree['cosine_mean'] <= 1
