"""`python -m train.face` refusing a bad flag or input (issue 46, "nothing lost, never silent"): exit code 2, one
`error:` line on stderr (no traceback, no argparse usage block, no log line before it) and no run folder left
behind: every refusal comes before the folder is made. In process: no torch import per case."""
import logging
from pathlib import Path

import pytest
import torch

from train import face, loop
from train.synthetic import identity_images, make_pack, write_image_folder

TINY = ['--model', 'mobileone_112_test']


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
    """2 identities x 4 crops, a 4-pair validation pack named `val`, a mobilefacenet teacher's weights, and folders
    of extra crops: empty, undecodable first image, undecodable second image."""
    import timm
    import timm_mobileone  # noqa: F401
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp('errors')
    samples = identity_images(2, 4, seed=5)
    torch.manual_seed(0)
    teacher = root / 'teacher.safetensors'
    save_file({k: v.contiguous() for k, v in timm.create_model('mobilefacenet').state_dict().items()}, str(teacher))
    (root / 'empty' / 'nested').mkdir(parents=True)
    good = write_image_folder(root / 'good_extra', samples[:1])
    for name, first in (('bad_first', 'a.jpg'), ('bad_later', 'b.jpg')):
        folder = root / name
        folder.mkdir()
        (folder / ('b.jpg' if first == 'a.jpg' else 'a.jpg')).write_bytes(next(good.rglob('*.jpg')).read_bytes())
        (folder / first).write_bytes(b'not a jpeg')
    bad_data = write_image_folder(root / 'bad_data', samples)
    sorted(bad_data.rglob('*.jpg'))[-1].write_bytes(b'not a jpeg')  # decoded in the first epoch, not up front
    (root / 'a_file').write_text('not a folder')
    return dict(root=root, data=write_image_folder(root / 'faces', samples), val=make_pack(root / 'val.bin', 4),
                teacher=teacher, bad_data=bad_data)


def _teacher(d, *extra):
    return ['--teacher', 'mobilefacenet', '--teacher-checkpoint', str(d['teacher']), '--loss', 'none',
            '--model-kwargs', 'embed_dim=128', *extra]


def refused(capsys, caplog, argv, out: Path, quiet: bool = True) -> str:
    """`train.face argv` refused: exit 2, exactly one `error:` line on stderr, no traceback or usage block, no
    log line at INFO or above (with `quiet`: what the CLI would print before the error), `out` not made."""
    capsys.readouterr()
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as e:
        face.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    assert 'Traceback' not in err and 'usage:' not in err
    if quiet:
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    return lines[0]


CASES = {
    # flag checks, before anything is built: no usage block, one line
    'teacher-without-weights': (lambda d: ['--teacher', 'mobilefacenet', '--model-kwargs', 'embed_dim=128', '--loss',
                                           'none'], 'no weights given, and a teacher is never random'),
    'tagged-teacher-without-weights': (lambda d: ['--teacher', 'mobileone_112_s0.apple_in1k', '--loss', 'none'],
                                       '--teacher mobileone_112_s0.apple_in1k: no weights given'),
    'hub-teacher': (lambda d: ['--teacher', 'local-dir:hub', '--loss', 'none'], 'are not supported'),
    'checkpoint-and-onnx-teacher': (lambda d: _teacher(d, '--teacher-onnx', 't.onnx'), 'one way'),
    'best-on-without-val': (lambda d: ['--best-on', 'lfw'], '--best-on lfw: names a --val set, and no --val'),
    'relational-weight-without-teacher': (lambda d: ['--relational-weight', '1'], '--relational-weight needs --teacher'),
    'hint-weight-without-teacher': (lambda d: ['--hint-weight', '1'], '--hint-weight needs --teacher'),
    'negative-hint-weight': (lambda d: _teacher(d, '--hint-weight', '-1'), '--hint-weight must be >= 0'),
    'negative-distill-weight': (lambda d: _teacher(d, '--distill-weight', '-1'), '--distill-weight must be > 0'),
    'negative-relational-weight': (lambda d: _teacher(d, '--relational-weight', '-1'),
                                   '--relational-weight must be >= 0'),
    'loss-none-without-teacher': (lambda d: ['--loss', 'none'], '--loss none trains with no loss at all'),
    'hint-weight-with-onnx-teacher': (lambda d: ['--teacher', 'mobilefacenet', '--teacher-onnx', 't.onnx', '--loss',
                                                 'none', '--hint-weight', '1'], "needs the teacher's feature maps"),
    'teacher-cache-is-a-folder': (lambda d: _teacher(d, '--teacher-cache', str(d['root'])), 'a folder; give the'),
    'extra-data-missing': (lambda d: _teacher(d, '--extra-data', str(d['root'] / 'nowhere')), 'no such folder'),
    'epochs-0': (lambda d: ['--epochs', '0'], '--epochs must be >= 1'),
    'batch-size-0': (lambda d: ['-b', '0'], '--batch-size must be >= 1'),
    'workers-negative': (lambda d: ['-j', '-1'], '--workers must be >= 0'),
    'sample-rate-0': (lambda d: ['--sample-rate', '0'], '--sample-rate must be in (0, 1]'),
    'adaface-t-alpha-2': (lambda d: ['--adaface-t-alpha', '2'], '--adaface-t-alpha must be in [0, 1]'),
    'num-classes-1': (lambda d: ['--num-classes', '1'], '--num-classes must be >= 2'),
    'tag-uppercase': (lambda d: ['--tag', 'MS1M'], '--tag: use lowercase letters'),
    'model-kwargs-malformed': (lambda d: ['--model-kwargs', 'embed_dim'], "--model-kwargs: 'embed_dim' is not KEY=VALUE"),
    'lr-negative': (lambda d: ['--lr', '-0.1'], '--lr must be a finite number >= 0 (got -0.1)'),
    'lr-nan': (lambda d: ['--lr', 'nan'], '--lr must be a finite number >= 0 (got nan)'),
    'momentum-negative': (lambda d: ['--momentum', '-1'], '--momentum must be a finite number >= 0'),
    'weight-decay-negative': (lambda d: ['--weight-decay', '-1'], '--weight-decay must be a finite number >= 0'),
    'scale-0': (lambda d: ['--scale', '0'], '--scale must be > 0'),
    'drop-path-1': (lambda d: ['--drop-path', '1'], '--drop-path must be in [0, 1)'),
    'clip-grad-0': (lambda d: ['--clip-grad', '0'], '--clip-grad must be a finite number > 0'),
    'model-ema-decay-2': (lambda d: ['--model-ema-decay', '2'], '--model-ema-decay must be in [0, 1]'),
    # checks of what the flags name, before the run folder is made
    'device-unknown': (lambda d: ['--device', 'tpu9'], '--device tpu9: not a torch device'),
    'model-kwargs-unknown': (lambda d: ['--model-kwargs', 'colour=1'], "unexpected keyword argument 'colour'"),
    'adaface-batch-of-1': (lambda d: ['--loss', 'adaface', '-b', '1'], 'adaface needs a global batch of at least 2'),
    'channels-last-on-cpu': (lambda d: ['--channels-last'], 'oneDNN#6035'),
    'val-missing': (lambda d: ['--val', str(d['root'] / 'nowhere.bin')], 'nowhere.bin: no such file'),
    'best-on-not-a-val-set': (lambda d: ['--val', str(d['val']), '--best-on', 'lfw'],
                              '--best-on lfw: not one of the --val sets (val)'),
    'batch-larger-than-the-data': (lambda d: ['-b', '16'], '8 images make no full batch of 16 x 1 processes'),
    'crops-of-another-size': (lambda d: ['--model', 'test_resnet'], 'expected aligned 160x160 crops'),
    'extra-data-empty': (lambda d: _teacher(d, '--extra-data', str(d['root'] / 'empty')),
                         'error: --extra-data ', 'empty: no images found'),
    'extra-data-undecodable-first-image': (lambda d: _teacher(d, '--extra-data', str(d['root'] / 'bad_first')),
                                           'error: --extra-data ', 'a.jpg: image cannot be decoded'),
    'teacher-checkpoint-missing': (lambda d: ['--teacher', 'mobilefacenet', '--teacher-checkpoint',
                                              str(d['root'] / 'nowhere.safetensors'), '--loss', 'none'],
                                   'error: --teacher mobilefacenet: '),
    'teacher-with-sharded-head': (lambda d: _teacher(d, '--head', 'sharded'), 'use --head replicated'),
    'teacher-without-embed-dim': (lambda d: _teacher(d)[:-2], 'embeds 128-d, the student 512-d'),
}


@pytest.mark.parametrize('case', list(CASES))
def test_refused_in_one_line_before_the_run_folder(inputs, tmp_path, capsys, caplog, case):
    flags, *expected = CASES[case]
    out = tmp_path / 'run'
    argv = [*TINY, '--data', str(inputs['data']), '--output', str(out), '--epochs', '1', '-b', '4', '-j', '0',
            '--no-export', *flags(inputs)]
    line = refused(capsys, caplog, argv, out)
    assert all(e in line for e in expected), line


def test_an_undecodable_extra_image_found_by_the_teacher_pass_names_extra_data(inputs, tmp_path, capsys, caplog):
    """Its second image: the first-image probe passes it, the teacher's target pass decodes it (and logs that it
    runs): the line names --extra-data, not --data; no cache and no folder are left."""
    out = tmp_path / 'run'
    argv = [*TINY, '--data', str(inputs['data']), '--output', str(out), '-b', '4', '-j', '0', '--no-export',
            *_teacher(inputs, '--extra-data', str(inputs['root'] / 'bad_later'))]
    line = refused(capsys, caplog, argv, out, quiet=False)
    assert line.startswith(f'error: --extra-data {inputs["root"] / "bad_later" / "b.jpg"}: image cannot be decoded')


def test_a_bad_image_in_the_first_batches_leaves_no_empty_folder(inputs, tmp_path, capsys, caplog):
    """A margin run decodes its images in the steps: the run starts, stops at the bad one (a line naming --data),
    and the folder it made, still empty, goes."""
    out = tmp_path / 'run'
    argv = [*TINY, '--data', str(inputs['bad_data']), '--output', str(out), '--epochs', '1', '-b', '4', '-j', '0',
            '--no-export']
    line = refused(capsys, caplog, argv, out, quiet=False)
    assert line.startswith('error: --data ') and 'image cannot be decoded' in line
    existing = tmp_path / 'mine'
    existing.mkdir()  # a folder the user made is never removed
    argv[argv.index(str(out))] = str(existing)
    with pytest.raises(SystemExit):
        face.main(argv)
    assert existing.is_dir()


def test_an_output_that_is_a_file_is_refused_and_kept(inputs, capsys, caplog):
    path = inputs['root'] / 'a_file'
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as e:
        face.main([*TINY, '--data', str(inputs['data']), '--output', str(path), '-b', '4', '-j', '0', '--no-export'])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f'error: --output {path}: not a folder']
    assert path.read_text() == 'not a folder'


def test_interrupted_before_the_first_checkpoint_keeps_nothing(inputs, tmp_path, capsys, monkeypatch):
    """Ctrl-C in the first step: exit 130, a line that says nothing can be resumed (not "resume with --resume"),
    no empty folder."""
    def interrupted(self, images, labels):
        raise KeyboardInterrupt
    monkeypatch.setattr(loop.Trainer, 'train_step', interrupted)
    out = tmp_path / 'run'
    with pytest.raises(SystemExit) as e:
        face.main([*TINY, '--data', str(inputs['data']), '--output', str(out), '-b', '4', '-j', '0', '--no-export'])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        'error: interrupted before the first checkpoint: nothing to resume']
    assert not out.exists()
