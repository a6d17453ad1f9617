"""`python -m train.compare_blocks`: MobileOne vs DBB trained alike on generated identities, end to end, and its
refusals. One comparison is run per module and shared (training, costs and INT8 take a minute on 2 cores)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train.synthetic import identity_images, make_pack, write_image_folder

REPO = Path(__file__).resolve().parents[1]
MODELS = ['mobileone_112_test', 'mobileone_112_dbb_test']  # the tiny members: the machinery is under test


def _cli(*argv, check=True):
    proc = subprocess.run([sys.executable, '-m', 'train.compare_blocks', *map(str, argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _main_exit(argv, capsys):
    from train import compare_blocks
    with pytest.raises(SystemExit) as e:
        compare_blocks.main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err.strip()


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('cmp')
    write_image_folder(root / 'train', identity_images(identities=4, per_identity=8, seed=0))
    make_pack(root / 'val.bin', num_pairs=20, seed=3)
    return root


@pytest.fixture(scope='module')
def compared(data):
    out = data / 'out'
    proc = _cli('--models', *MODELS, '--data', data / 'train', '--val', data / 'val.bin', '--output', out,
                '--epochs', '1', '-b', '8', '--lr', '0.01', '--warmup-epochs', '0.25', '--log-interval', '1',
                '-j', '0', '--cost-steps', '1', '--cost-batch-size', '4', '--calib-images', '16',
                '--heldout-images', '8')
    return out, json.loads(proc.stdout)


def test_report_compares_every_axis(compared):
    out, report = compared
    assert report['models'] == MODELS
    assert (out / 'compare.md').read_text().count('| mobileone_112_dbb_test |') == 3  # cost, accuracy, INT8 tables
    assert (out / 'compare.png').read_bytes()[:4] == b'\x89PNG'
    assert json.loads((out / 'compare.json').read_text()) == report
    # the same data order and recipe for both: the runs differ in the model alone
    assert {r['model'] for r in report['runs']} == set(MODELS) and {r['seed'] for r in report['runs']} == {1}
    mo, dbb = report['training_cost']
    assert dbb['params_m'] != mo['params_m'] and mo['step_s'] > 0 and dbb['step_s'] > 0
    assert mo['step_memory_mb'] > 0 and dbb['step_memory_mb'] > 0
    # deploy: one fused network for both
    assert report['deploy_cost'][0]['params_m'] == report['deploy_cost'][1]['params_m']
    assert report['deploy_cost'][0]['gmacs'] == report['deploy_cost'][1]['gmacs']
    for row in report['summary']:
        assert row['diverged'] == 0 and row['final_loss']['mean'] > 0
        assert row['grad_norm_median']['mean'] > 0
        acc = row['accuracy']['val']
        assert 0 <= acc['best']['mean'] <= 1 and acc['final']['mean'] <= acc['best']['mean']
        q = row['int8']
        assert 0 < q['cosine_min']['mean'] <= q['cosine_mean']['mean'] <= 1
        assert set(q['accuracy_int8']) == {'val'}
    run = report['runs'][0]
    layers = run['int8']['weights']['layers']
    # stem, 4 stages of a depthwise + pointwise pair, the last pair's SE (2 convs each), GDC conv, projection
    assert layers[0]['layer'] == 'stem.reparam_conv' and len(layers) == 1 + 2 * 4 + 2 * 2 + 2
    assert all(x['range_spread'] >= 1 for x in layers)


def test_finished_runs_compare_again_without_training(compared):
    from train import compare_blocks
    out, report = compared
    runs = [r['folder'] for r in report['runs']]
    again = compare_blocks.main(['--runs', *runs, '--output', str(out / 'again'), '--no-int8', '--no-cost'])
    assert again['training_cost'] is None
    for a, b in zip(again['summary'], report['summary']):
        assert a['model'] == b['model'] and a['accuracy'] == b['accuracy'] and a['final_loss'] == b['final_loss']


def test_runs_with_another_recipe_are_refused(compared, tmp_path, capsys):
    out, report = compared
    first, second = (Path(r['folder']) for r in report['runs'])
    other = tmp_path / 'other'
    shutil.copytree(second, other)
    state = json.loads((other / 'last.json').read_text())
    state['run']['epochs'] = 3
    (other / 'last.json').write_text(json.dumps(state))
    code, err = _main_exit(['--runs', first, other, '--output', tmp_path / 'r', '--no-int8', '--no-cost'], capsys)
    assert code == 2 and err.splitlines()[-1].startswith('error: ') and 'epochs=3 vs 1' in err
    assert not (tmp_path / 'r').exists()


@pytest.mark.parametrize('argv, message', [
    (['--models', 'mobileone_112_s0', 'mobileone_112_nope'], "unknown model 'mobileone_112_nope'"),
    (['--models', 'mobileone_112_s0', 'mobileone_112_s0:head_type=gap'], 'head_type must be one of'),
    (['--models', 'mobileone_112_s0', 'mobileone_112_s0:head_chs'], 'is not KEY=VALUE'),
])
def test_bad_models_exit_2(data, tmp_path, capsys, argv, message):
    code, err = _main_exit([*argv, '--data', data / 'train', '--val', data / 'val.bin', '--output', tmp_path / 'o'],
                           capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f'error: --models {argv[-1]}: ')
    assert message in err and not (tmp_path / 'o').exists()


def test_folder_that_is_not_a_run_exits_2(tmp_path, capsys):
    (tmp_path / 'x').mkdir()
    code, err = _main_exit(['--runs', tmp_path / 'x', tmp_path / 'x', '--output', tmp_path / 'o'], capsys)
    assert code == 2 and 'not a train.face run' in err and not (tmp_path / 'o').exists()
