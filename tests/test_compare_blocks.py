"""`python -m train.compare_blocks`: MobileOne vs DBB trained alike on generated identities, end to end, and its
refusals. One comparison is run per module and shared (training, costs and INT8 take a minute on 2 cores)."""
import functools
import json
import shutil
from pathlib import Path

import pytest

from train import compare_blocks, face
from train.synthetic import identity_images, make_pack, write_image_folder
from helpers import run_main

REPO = Path(__file__).resolve().parents[1]
MODELS = ['mobileone_112_test', 'mobileone_112_dbb_test']  # the tiny members: the machinery is under test


def _main_exit(argv, capsys):
    with pytest.raises(SystemExit) as e:
        compare_blocks.main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err.strip()


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('cmp')
    write_image_folder(root / 'train', identity_images(identities=4, per_identity=8, seed=0))
    make_pack(root / 'val.bin', num_pairs=20, seed=3)
    return root


RECIPE = ['--epochs', '1', '-b', '8', '--lr', '0.01', '--warmup-epochs', '0.25', '--log-interval', '1', '-j', '0',
          '--device', 'cpu']


@pytest.fixture(scope='module')
def compared(data):
    """The comparison, in this process (a Python + torch start costs 7-15 s here; the command's own process adds
    nothing the report shows). compare_blocks trains the MobileOne run itself (`python -m train.face` in a
    subprocess); the DBB run is trained here first with the flags compare_blocks passes, in the folder it would
    use, so compare_blocks reuses it as a finished run (its documented reuse of finished folders): the same recipe
    either way, which the comparison checks (`check_same_recipe`)."""
    out = data / 'out'
    face.main(['--model', MODELS[1], '--data', str(data / 'train'), '--val', str(data / 'val.bin'), '--output',
               str(out / f'{MODELS[1]}-seed1'), '--seed', '1', '--no-export', *RECIPE])
    with pytest.MonkeyPatch.context() as mp:  # batch-1 latency from 3 rounds, not 20 (its value is not checked)
        mp.setattr(compare_blocks, 'deploy_cost', functools.partial(compare_blocks.deploy_cost, repeats=3))
        proc = run_main('train.compare_blocks', '--models', *MODELS, '--data', data / 'train', '--val',
                        data / 'val.bin', '--output', out, *RECIPE, '--cost-steps', '1', '--cost-batch-size', '4',
                        '--calib-images', '16', '--heldout-images', '8', cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # compare_blocks keeps each train.face subprocess's stderr beside its run: one for MobileOne, none for DBB
    assert sorted(p.name for p in out.glob('*.stderr.log')) == [f'{MODELS[0]}-seed1.stderr.log']
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
