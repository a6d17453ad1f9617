"""`python -m eval.imagenet` on a generated ImageFolder."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import timm
from eval import imagenet

from helpers import calibrate_bn, run_main

REPO = Path(__file__).resolve().parents[1]
CLASSES = ('cat', 'dog', 'fox', 'owl', 'yak', 'zebu')
MODEL = 'mobileone_112_test'  # tiny: the command's data, metrics and errors are under test, not an architecture


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('imagefolder')
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir()
        for i in range(5):
            base = rng.integers(0, 256, size=(9, 9, 3)).astype(np.uint8)
            Image.fromarray(base).resize((96, 80), Image.BILINEAR).save(root / c / f'{i}.jpg', quality=90)
    return root


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = calibrate_bn(timm.create_model(MODEL, global_pool='avg', num_classes=len(CLASSES)))
    path = tmp_path_factory.mktemp('ckpt') / 'cls.pth'
    torch.save(model.state_dict(), path)
    return path


ARGS = ['--model', MODEL, '--global-pool', 'avg', '--num-classes', str(len(CLASSES)),
        '--workers', '0', '--no-progress', '-b', '7']


def test_top1_top5_equal_direct_predictions(folder, checkpoint, capsys):
    result = imagenet.main(ARGS + ['--checkpoint', str(checkpoint), '--data-dir', str(folder)])
    # the same model and preprocessing, by hand
    model = timm.create_model(MODEL, global_pool='avg', num_classes=len(CLASSES),
                              checkpoint_path=str(checkpoint)).eval()
    cfg = timm.data.resolve_data_config(model=model)
    transform = timm.data.create_transform(**cfg)
    logits, targets = [], []
    with torch.no_grad():
        for idx, c in enumerate(sorted(CLASSES)):
            for f in sorted((folder / c).iterdir()):
                logits.append(model(transform(Image.open(f).convert('RGB')).unsqueeze(0))[0])
                targets.append(idx)
    logits, targets = torch.stack(logits), torch.tensor(targets)
    top1 = (logits.argmax(1) == targets).float().mean().item() * 100
    top5 = (logits.topk(5, 1).indices == targets[:, None]).any(1).float().mean().item() * 100
    loss = torch.nn.functional.cross_entropy(logits, targets).item()
    assert result['num_images'] == 30
    assert result['top1'] == pytest.approx(top1, abs=1e-3)
    assert result['top5'] == pytest.approx(top5, abs=1e-3)
    assert result['loss'] == pytest.approx(loss, rel=1e-3)
    assert result['img_size'] == [112, 112] and result['crop_pct'] == 1.0 and result['reparam'] is True
    assert result['rows'] == [dict(dataset='imagenet', kind='classification', num=30, top1=result['top1'],
                                   top5=result['top5'])]
    assert result['rerun']['args'][result['rerun']['args'].index('--data-dir') + 1] == folder.name
    for key in ('model', 'checkpoint', 'data', 'num_images', 'top1', 'top5', 'loss', 'img_size', 'crop_pct',
                'interpolation', 'seconds', 'versions'):
        assert key in result


def test_class_map_maps_folders_to_outputs(folder, checkpoint, tmp_path):
    class_map = tmp_path / 'map.txt'
    class_map.write_text('\n'.join(sorted(CLASSES)) + '\n')
    result = imagenet.main(ARGS + ['--checkpoint', str(checkpoint), '--data-dir', str(folder),
                                   '--class-map', str(class_map)])
    assert result['num_images'] == 30


def _cli(*argv, process: bool = False):
    """The command's result: in a subprocess for one case (the process's exit code itself), in-process elsewhere."""
    if process:
        return subprocess.run([sys.executable, '-m', 'eval.imagenet', *argv], capture_output=True, text=True,
                              cwd=REPO)
    return run_main('eval.imagenet', *argv)


@pytest.mark.parametrize('case, match', [
    ('missing', 'no such folder'),
    ('empty', 'no images found'),
    ('mismatch', f'has 6 classes but {MODEL} has 10 outputs'),
    ('embedding', 'has no classifier'),
])
def test_bad_input_exits_2(case, match, folder, tmp_path):
    args = ['--model', MODEL, '--workers', '0', '--no-progress']
    if case == 'missing':
        args += ['--data-dir', str(tmp_path / 'nope'), '--global-pool', 'avg', '--num-classes', '6']
    elif case == 'empty':
        (tmp_path / 'empty' / 'a').mkdir(parents=True)
        args += ['--data-dir', str(tmp_path / 'empty'), '--global-pool', 'avg', '--num-classes', '6']
    elif case == 'mismatch':
        args += ['--data-dir', str(folder), '--global-pool', 'avg', '--num-classes', '10']
    else:
        args += ['--data-dir', str(folder)]
    proc = _cli(*args, process=case == 'missing')
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and match in lines[0] and 'Traceback' not in proc.stderr
