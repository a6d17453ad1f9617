"""`python -m eval.lfw / eval.cfp / eval.verify` end to end on generated packs."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import timm
from eval import cfp, lfw, verify
from eval.api import combine_views, l2_normalize
from timm_mobileone import results as R

from helpers import SMALL_LFW, calibrate_bn, needs_small_lfw, run_main
from train.synthetic import make_pack

REPO = Path(__file__).resolve().parents[1]
# the tiny test model: these tests are about the CLIs' machinery (protocol, flip, fusion, files), not an architecture;
# it has the train-time branches (two conv branches, scale and skip branches, an SE block) that --reparam fuses
MODEL = 'mobileone_112_test'
COMMON = ['--model', MODEL, '--batch-size', '16', '--workers', '0', '--no-progress']
KEYS = {'model': str, 'checkpoint': (str, type(None)), 'dataset': str, 'num_pairs': int, 'flip': bool,
        'accuracy': float, 'accuracy_std': float, 'thresholds': list, 'tar_at_far': (float, type(None)),
        'auc': (float, type(None)), 'xnorm': float, 'seconds': float, 'versions': dict, 'reparam': bool,
        'input_size': list, 'tag': str, 'command': str}


@pytest.fixture(scope='module')
def pack(tmp_path_factory):
    return make_pack(tmp_path_factory.mktemp('packs') / 'lfw.bin', num_pairs=25, seed=1)


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A train-time model with calibrated BN statistics, so that its embeddings are well conditioned."""
    torch.manual_seed(0)
    model = calibrate_bn(timm.create_model(MODEL))
    path = tmp_path_factory.mktemp('ckpt') / 'model.pth'
    torch.save(model.state_dict(), path)
    return path


def test_lfw_json_keys_and_types(pack, checkpoint, capsys, tmp_path):
    results_file = tmp_path / 'out' / 'r.json'
    result = lfw.main(COMMON + ['--checkpoint', str(checkpoint), '--data', str(pack),
                                '--results-file', str(results_file)])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(results_file.read_text()) == json.loads(json.dumps(result))
    for key, types in KEYS.items():
        assert isinstance(printed[key], types), key
    assert printed['num_pairs'] == 25 and printed['dataset'] == 'lfw' and printed['flip'] and printed['reparam']
    assert len(printed['thresholds']) == 10 and 0 <= printed['accuracy'] <= 1
    assert printed['input_size'] == [3, 112, 112] and printed['tag'] == 'untrained'
    assert printed['command'].startswith(f'python -m eval.lfw --model {MODEL}')
    # the result schema the Hub tools read: one verification row, and the command as others rerun it
    from timm_mobileone import results
    read = results.read(str(results_file))
    assert read['rows'] == [dict(dataset='lfw', kind='verification', num=25, flip=True, accuracy=printed['accuracy'],
                                 accuracy_std=printed['accuracy_std'], tar_at_far=printed['tar_at_far'],
                                 far_target=0.001, threshold=R.cosine_threshold(printed['thresholds']))]
    t = sorted(printed['thresholds'])  # the cosine of the folds' median squared-distance threshold
    assert read['rows'][0]['threshold'] == pytest.approx(1 - (t[4] + t[5]) / 4, abs=1e-6)
    assert read['rerun']['module'] == 'eval.lfw' and '--checkpoint' not in read['rerun']['args']
    assert read['rerun']['args'][read['rerun']['args'].index('--data') + 1] == pack.name


def test_results_file_on_a_device_is_written_in_place(pack, checkpoint, tmp_path):
    """--results-file /dev/stdout or a FIFO must be written, not replaced by a renamed temporary file."""
    import os
    import threading
    fifo = tmp_path / 'results.fifo'
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(open(fifo).read()))
    reader.start()
    lfw.main(COMMON + ['--checkpoint', str(checkpoint), '--data', str(pack), '--results-file', str(fifo)])
    reader.join(timeout=30)
    assert fifo.is_fifo()
    assert json.loads(received[0])['dataset'] == 'lfw'


def test_embeddings_follow_the_protocol(pack, checkpoint, tmp_path):
    """What the CLI scores = (raw(x) + raw(flip(x))) normalized, x = (img / 255 - 0.5) / 0.5, fused model."""
    saved = tmp_path / 'emb.npy'
    lfw.main(COMMON + ['--checkpoint', str(checkpoint), '--data', str(pack), '--save-embeddings', str(saved)])
    emb = np.load(saved)
    model = timm.create_model(MODEL, checkpoint_path=str(checkpoint)).eval()
    with open(pack, 'rb') as f:
        bins, _ = pickle.load(f)
    from PIL import Image
    import io
    imgs = torch.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(b.tobytes())).convert('RGB')).copy())
                        .permute(2, 0, 1) for b in bins])
    x = (imgs.float() / 255 - 0.5) / 0.5
    with torch.no_grad():  # the train-time model: the CLI's fused one must agree within reparam tolerance
        raw, raw_flip = model(x).numpy(), model(x.flip(3)).numpy()
    expected = combine_views(raw, raw_flip)
    assert emb.shape == (50, 512)
    np.testing.assert_allclose(emb, expected, atol=1e-4)
    # --no-flip embeds the image alone
    lfw.main(COMMON + ['--checkpoint', str(checkpoint), '--data', str(pack), '--save-embeddings', str(saved),
                       '--no-flip', '--no-reparam'])
    np.testing.assert_allclose(np.load(saved), l2_normalize(raw), atol=1e-5)


def test_saved_embeddings_score_the_same(pack, checkpoint, tmp_path, capsys):
    saved = tmp_path / 'emb.npy'
    first = lfw.main(COMMON + ['--checkpoint', str(checkpoint), '--data', str(pack), '--save-embeddings', str(saved)])
    again = lfw.main(['--embeddings', str(saved), '--data', str(pack), '--no-progress'])
    for key in ('accuracy', 'accuracy_std', 'thresholds', 'tar_at_far', 'auc', 'num_pairs'):
        assert again[key] == first[key], key
    assert again['model'] is None and again['flip'] is False


def test_verify_several_packs_and_plot(pack, checkpoint, tmp_path, capsys):
    other = make_pack(tmp_path / 'cfp_fp.bin', num_pairs=20, seed=2)
    plot = tmp_path / 'roc.png'
    result = verify.main(COMMON + ['--checkpoint', str(checkpoint), '--data', str(pack), '--data', str(other),
                                   '--plot', str(plot), '--save-embeddings', str(tmp_path / 'e.npy')])
    assert [r['dataset'] for r in result['results']] == ['lfw', 'cfp_fp']
    assert result['mean_accuracy'] == pytest.approx(np.mean([r['accuracy'] for r in result['results']]), abs=1e-5)
    assert plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert (tmp_path / 'e_lfw.npy').is_file() and (tmp_path / 'e_cfp_fp.npy').is_file()


def test_cfp_finds_both_packs_in_data_dir(checkpoint, tmp_path):
    make_pack(tmp_path / 'cfp_fp.bin', num_pairs=10, seed=3)
    make_pack(tmp_path / 'cfp_ff.bin', num_pairs=10, seed=4)
    result = cfp.main(COMMON + ['--checkpoint', str(checkpoint), '--data-dir', str(tmp_path)])
    assert [r['dataset'] for r in result['results']] == ['cfp_fp', 'cfp_ff']


@needs_small_lfw
def test_small_lfw_end_to_end(capsys):
    result = lfw.main(COMMON + ['--data', str(SMALL_LFW)])
    assert result['num_pairs'] == 10
    assert result['tar_at_far'] is None and result['auc'] is None  # all 10 pairs are positive


def _cli(*args, process: bool = False):
    """`python -m args...`: in a subprocess where the process is the point (eval.verify's own exit code), else
    in-process (the same main(argv), without a Python + torch start per case)."""
    if process:
        return subprocess.run([sys.executable, '-m', *args], capture_output=True, text=True, cwd=REPO)
    return run_main(*args)


@needs_small_lfw
@pytest.mark.parametrize('argv, match', [
    (['eval.lfw', '--data', 'missing.bin'], 'missing.bin: no such file'),
    (['eval.lfw', '--model', 'not_a_model', '--data', str(SMALL_LFW)], "cannot create model 'not_a_model'"),
    (['eval.lfw', '--checkpoint', 'nope.pth', '--data', str(SMALL_LFW)], 'nope.pth'),
    (['eval.lfw'], 'give --data'),
    (['eval.verify', '--data-dir', '/nonexistent-dir'], 'no such folder'),
    (['eval.lfw', '--data', str(SMALL_LFW), '--num-folds', '20'], 'cannot make 20 folds'),
])
def test_user_errors_exit_2_with_one_line(argv, match):
    proc = _cli(*argv, '--no-progress', process=argv[0] == 'eval.verify')
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ''
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and match in lines[0] and 'Traceback' not in proc.stderr


def test_bad_image_in_pack_exits_2(tmp_path):
    path = make_pack(tmp_path / 'p.bin', num_pairs=10, style='bytes')
    with open(path, 'rb') as f:
        bins, issame = pickle.load(f)
    bins[7] = b'\xff\xd8\xff garbage'
    with open(path, 'wb') as f:
        pickle.dump((bins, issame), f)
    proc = _cli('eval.lfw', '--data', str(path), '--workers', '1', '--no-progress')
    assert proc.returncode == 2
    assert 'image 7 cannot be decoded' in proc.stderr and 'Traceback' not in proc.stderr
    big = make_pack(tmp_path / 'big.bin', num_pairs=10, size=(128, 128))
    proc = _cli('eval.lfw', '--data', str(big), '--workers', '0', '--no-progress')
    assert proc.returncode == 2 and 'expected aligned 112x112' in proc.stderr


def test_malicious_pack_exits_2_without_running(tmp_path):
    marker = tmp_path / 'ran'
    path = tmp_path / 'evil.bin'
    path.write_bytes(b'cos\nsystem\n(S\'touch ' + str(marker).encode() + b'\'\ntR.')
    proc = _cli('eval.lfw', '--data', str(path), '--no-progress')
    assert proc.returncode == 2 and 'refusing to load os.system' in proc.stderr
    assert not marker.exists()
