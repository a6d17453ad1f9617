"""insightface's MobileFaceNet in PyTorch: the timm model, the MXNet `.params` reader, the graph check, the port's
output against insightface's own ncnn files, and real LFW through eval (shared data; skipped where absent)."""
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import timm
from timm.models import model_entrypoint

from benchmarks import fuzz_targets as F
from helpers import SHARED_DATA, calibrate_bn, rel_err
from timm_mobileone.checkpoints import create_model_checked
from timm_mobileone.errors import UserError
from timm_mobileone.models.mobilefacenet import INSIGHTFACE_STD
from timm_mobileone.mxnet import MXNetError, read_params, read_symbol, symbol_path_for

MFN_DIR = SHARED_DATA / 'mobilefacenet_y1'
PARAMS = MFN_DIR / 'model-0000.params'
LFW_DEV = SHARED_DATA / 'lfw_dev'
needs_mfn = pytest.mark.skipif(not PARAMS.is_file(), reason=f'{PARAMS} not found (shared test data)')
needs_lfw_dev = pytest.mark.skipif(not (LFW_DEV / 'pairs.txt').is_file() or not PARAMS.is_file(),
                                   reason=f'{LFW_DEV} not found (shared test data)')


# ----------------------------------------------------------------------------------------------------------------
# the timm model


def test_registered_with_insightface_preprocessing():
    assert model_entrypoint('mobilefacenet').__module__ == 'timm_mobileone.models.mobilefacenet'
    model = timm.create_model('mobilefacenet')
    cfg = timm.data.resolve_model_data_config(model)
    assert cfg['input_size'] == (3, 112, 112)
    # (x/255 - mean)/std is the MXNet graph's (x - 127.5) * 0.0078125
    x = torch.arange(256.)
    ours = (x / 255 - cfg['mean'][0]) / cfg['std'][0]
    torch.testing.assert_close(ours, (x - 127.5) * 0.0078125, rtol=0, atol=1e-6)
    assert model.pretrained_cfg['tag'] == 'insightface_ms1m_y1' and not model.pretrained_cfg.get('hf_hub_id')
    with pytest.raises(RuntimeError, match='No pretrained weights exist') as e:
        timm.create_model('mobilefacenet', pretrained=True)
    assert 'python -m timm_mobileone.mxnet' in str(e.value)


def test_forward_backward_features_and_params():
    model = timm.create_model('mobilefacenet', num_classes=7).train()
    assert 0.99e6 < sum(p.numel() for p in model.parameters()) - 128 * 7 - 7 < 1.01e6
    out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 7)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    feats = timm.create_model('mobilefacenet', features_only=True)(torch.randn(1, 3, 112, 112))
    assert [f.shape[1:] for f in feats] == [(64, 56, 56), (64, 28, 28), (128, 14, 14), (128, 7, 7)]
    model.reset_classifier(0)
    assert model.eval()(torch.randn(1, 3, 112, 112)).shape == (1, 128)


def test_reparameterize_is_exact_in_float64_and_loads_into_inference_mode():
    model = calibrate_bn(timm.create_model('mobilefacenet').double(), dtype=torch.float64)
    x = torch.randn(2, 3, 112, 112, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        fused = timm.utils.reparameterize_model(model)
        assert rel_err(fused(x), ref) < 1e-10
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    built = timm.create_model('mobilefacenet', inference_mode=True).double().eval()
    built.load_state_dict(fused.state_dict())
    with torch.no_grad():
        assert rel_err(built(x), ref) < 1e-10


def test_cross_layer_equalization_keeps_the_function_and_evens_ranges():
    from timm_mobileone.deploy.quant import channel_ranges, equalize
    # BN calibrated on batches of 2 here: float64 train-mode passes over batches of 8 were most of this test's time
    model = calibrate_bn(timm.create_model('mobilefacenet').double(), batch_size=2, dtype=torch.float64)
    fused = timm.utils.reparameterize_model(model)
    with torch.no_grad():  # uneven per-channel ranges, as BN folding leaves them
        fused.stem[0].conv.weight.mul_(torch.logspace(-2, 2, 64, dtype=torch.float64).view(-1, 1, 1, 1))
    x = torch.randn(2, 3, 112, 112, dtype=torch.float64)
    with torch.no_grad():
        ref = fused(x)
        lo, hi = channel_ranges(fused.stem[0].conv)
        equalize(fused)
        assert rel_err(fused(x), ref) < 1e-10
    lo2, hi2 = channel_ranges(fused.stem[0].conv)
    assert hi2 / lo2 < (hi / lo) / 10
    with pytest.raises(ValueError, match='reparameterize first'):
        equalize(timm.create_model('mobilefacenet'))
    # a fused MobileOne is a plain conv/ReLU chain: every pair of consecutive blocks equalizes, same function
    s0 = timm.utils.reparameterize_model(calibrate_bn(timm.create_model('mobileone_112_s0').double(), batch_size=2,
                                                      dtype=torch.float64))
    with torch.no_grad():
        ref = s0(x)
        assert len(s0.equalization_pairs()) == 44
        assert rel_err(equalize(s0)(x), ref) < 1e-10


# ----------------------------------------------------------------------------------------------------------------
# the .params reader


def test_reader_reads_v2_and_legacy_arrays(tmp_path):
    for version in ('v2', 'legacy'):
        path = tmp_path / f'{version}-0000.params'
        path.write_bytes(F.mxnet_params_bytes(F.MXNET_VALID, version))
        arrays = read_params(path)
        assert sorted(arrays) == ['conv_1_batchnorm_moving_var', 'conv_1_conv2d_weight', 'scale']
        for name, want in F.MXNET_VALID.items():
            np.testing.assert_array_equal(arrays[name.split(':')[1]], want)
            assert arrays[name.split(':')[1]].dtype == want.dtype


@pytest.mark.parametrize('case, message', [
    ('truncated', 'truncated or corrupt'),
    ('huge_shape', 'truncated or corrupt'),
    ('dtype', 'unknown dtype flag 99'),
    ('names', '3 arrays but 2 names'),
    ('trailing', 'bytes after the last name'),
    ('magic', 'not an MXNet .params file'),
    ('duplicate', 'appears twice'),
])
def test_reader_refuses_broken_files_in_one_line(tmp_path, case, message):
    valid = F.mxnet_params_bytes(F.MXNET_VALID)
    first = 24  # the first NDArray's header
    data = {
        'truncated': valid[:-40],
        'huge_shape': valid[:first + 12] + struct.pack('<q', 10 ** 9) + valid[first + 20:],
        'dtype': valid[:first + 52] + struct.pack('<i', 99) + valid[first + 56:],
        'names': F.mxnet_params_bytes(F.MXNET_VALID)[:-(8 + len('arg:scale'))].replace(
            struct.pack('<Q', 3) + struct.pack('<Q', len('arg:conv_1_conv2d_weight')),
            struct.pack('<Q', 2) + struct.pack('<Q', len('arg:conv_1_conv2d_weight'))),
        'trailing': valid + b'\0' * 8,
        'magic': b'\x13' + valid[1:],
        'duplicate': F.mxnet_params_bytes({'arg:a': np.ones(1, np.float32), 'aux:a': np.ones(1, np.float32)}),
    }[case]
    path = tmp_path / 'bad-0000.params'
    path.write_bytes(data)
    with pytest.raises(MXNetError, match=message) as e:
        read_params(path)
    assert '\n' not in str(e.value)


def test_symbol_path_follows_mxnet_naming():
    assert symbol_path_for('/x/model-0000.params') == Path('/x/model-symbol.json')
    assert symbol_path_for('/x/r100-0012.params') == Path('/x/r100-symbol.json')


# ----------------------------------------------------------------------------------------------------------------
# the real checkpoint (shared data)


@pytest.fixture(scope='module')
def mfn():
    return create_model_checked('mobilefacenet', checkpoint=str(PARAMS)).eval()


def _crops(n: int):
    from PIL import Image
    files = sorted(LFW_DEV.glob('*/*.jpg'))[:n]
    return np.stack([np.array(Image.open(f).convert('RGB')) for f in files]).astype(np.float32).transpose(0, 3, 1, 2)


@needs_lfw_dev
def test_port_equals_insightface_ncnn_fc1(mfn):
    pytest.importorskip('ncnn')
    from timm_mobileone.deploy.formats import ncnn_runner
    pixels = _crops(4)
    ref = ncnn_runner(str(MFN_DIR / "mobilefacenet.param"))(pixels)  # 0..255 RGB, the graph normalizes
    x = torch.from_numpy((pixels / 255 - 0.5) / INSIGHTFACE_STD[0]).float()
    with torch.no_grad():
        got = mfn(x).numpy()
        fused = timm.utils.reparameterize_model(mfn)(x).numpy()
    for out in (got, fused):
        cos = np.sum(out * ref, 1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() >= 0.99999


@needs_mfn
def test_checkpoint_that_does_not_fit_is_one_line(tmp_path):
    arrays = {('aux:' if 'moving' in k else 'arg:') + k: v for k, v in read_params(PARAMS).items()}
    cases = {
        'lacks': ({k: v for k, v in arrays.items() if 'res_4_block5_conv_dw' not in k},
                  r'lacks 6 tensors the model needs \(stages.1.6.conv_dw'),
        'extra': (dict(arrays, **{'arg:res_9_block0_conv_sep_conv2d_weight': np.ones((2, 2, 1, 1), np.float32)}),
                  'layers the model lacks: res_9_block0_conv_sep_conv2d_weight'),
        'shape': (dict(arrays, **{'arg:conv_1_conv2d_weight': np.ones((64, 3, 5, 5), np.float32)}),
                  'size mismatch for stem.0.conv.weight'),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f'{name}-0000.params'
        path.write_bytes(F.mxnet_params_bytes(content))
        with pytest.raises(UserError, match=message):
            create_model_checked('mobilefacenet', checkpoint=str(path))
    with pytest.raises(UserError, match='mobileone_112_s0 has no MXNet port'):
        create_model_checked('mobileone_112_s0', checkpoint=str(PARAMS))


@needs_mfn
def test_symbol_json_that_is_not_the_graph_is_refused(tmp_path):
    nodes = json.loads((MFN_DIR / 'model-symbol.json').read_text())
    (tmp_path / 'model-0000.params').symlink_to(PARAMS)
    edits = {
        'stride': ('dconv_34_conv_dw_conv2d', 'stride', '(1, 1)', 'dconv_34_conv_dw_conv2d is kernel'),
        'eps': ('fc1', 'eps', '0.001', 'fc1 has eps 0.001'),
        'norm': ('_mulscalar0', 'scalar', '0.00784313725', 'input normalization'),
    }
    for name, (node, attr, value, message) in edits.items():
        graph = json.loads(json.dumps(nodes))
        for n in graph['nodes']:
            if n['name'] == node:
                n.setdefault('attrs', {})[attr] = value
        (tmp_path / 'model-symbol.json').write_text(json.dumps(graph))
        with pytest.raises(UserError, match=message):
            create_model_checked('mobilefacenet', checkpoint=str(tmp_path / 'model-0000.params'))
    (tmp_path / 'model-symbol.json').write_text('{"nodes": [')
    with pytest.raises(UserError, match='not an MXNet symbol graph'):
        create_model_checked('mobilefacenet', checkpoint=str(tmp_path / 'model-0000.params'))
    assert read_symbol(MFN_DIR / 'model-symbol.json')['fc1']['op'] == 'BatchNorm'


@needs_mfn
def test_converter_writes_safetensors_that_plain_timm_loads(mfn, tmp_path, capsys):
    from timm_mobileone.mxnet.__main__ import main
    out = tmp_path / 'mfn.safetensors'
    result = main(['--params', str(PARAMS), '--out', str(out)])
    assert json.loads(capsys.readouterr().out)['tensors'] == result['tensors']
    plain = timm.create_model('mobilefacenet', checkpoint_path=str(out)).eval()
    overlay = timm.create_model('mobilefacenet', pretrained=True, pretrained_cfg_overlay=dict(file=str(out))).eval()
    main(['--params', str(PARAMS), '--out', str(tmp_path / 'fused.safetensors'), '--fused'])
    fused = timm.create_model('mobilefacenet', inference_mode=True,
                              checkpoint_path=str(tmp_path / 'fused.safetensors')).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ref = mfn(x)
        for m in (plain, overlay, fused):
            assert rel_err(m(x), ref) < 1e-5
    with pytest.raises(SystemExit) as e:
        main(['--params', str(tmp_path / 'missing-0000.params'), '--out', str(tmp_path / 'x.safetensors')])
    assert e.value.code == 2 and not (tmp_path / 'x.safetensors').exists()
    assert capsys.readouterr().err.count('\n') == 1


# ----------------------------------------------------------------------------------------------------------------
# real LFW through eval (a small subset of lfw_dev's pairs in the suite; the full 3,000 pairs are a benchmark)


def _subset(tmp_path, folds: int, per_class: int) -> Path:
    """An LFW-style pairs.txt (header `folds per_class`) over the first `per_class` same-person and different-person
    pairs of each of LFW's first `folds` folds, in LFW's order (each fold's same pairs, then its different ones)."""
    lines = (LFW_DEV / 'pairs.txt').read_text().splitlines()[1:]
    picked = [ln for k in range(folds) for start in (600 * k, 600 * k + 300)
              for ln in lines[start:start + per_class]]
    root = tmp_path / 'lfw_sub'
    root.mkdir()
    for name in {f for ln in picked for f in ln.split() if not f.isdigit()}:
        (root / name).symlink_to((LFW_DEV / name).resolve())
    (root / 'pairs.txt').write_text(f'{folds} {per_class}\n' + '\n'.join(picked) + '\n')
    return root


@needs_lfw_dev
def test_eval_lfw_on_real_faces_takes_folds_from_the_header(tmp_path, caplog):
    from eval.lfw import main
    root, emb = _subset(tmp_path, 2, 10), tmp_path / 'emb.npy'
    r = main(['--model', 'mobilefacenet', '--checkpoint', str(PARAMS), '--data', str(root), '--no-progress',
              '-b', '40', '-j', '0', '--save-embeddings', str(emb)])
    assert r['num_folds'] == 2 and r['folds_from'] == 'pairs.txt header' and r['single_class_folds'] == 0
    assert r['accuracy'] >= 0.9 and r['auc'] >= 0.95 and 7 < r['xnorm'] < 13
    assert r['preprocessing'] == dict(pixels='normalized', mean=[0.5] * 3, std=list(INSIGHTFACE_STD),
                                      channel_order='rgb')
    # the usual 10 folds over a list ordered same-then-different: single-class folds, said in the JSON
    r10 = main(['--data', str(root), '--embeddings', str(emb), '--num-folds', '10'])
    assert r10['num_folds'] == 10 and r10['folds_from'] == '--num-folds' and r10['single_class_folds'] == 8
    assert r10['auc'] == r['auc'] and 'one class only' in caplog.text


@needs_lfw_dev
def test_third_party_ncnn_artifact_scores_alike_with_raw_pixels(tmp_path, capsys):
    pytest.importorskip('ncnn')
    from eval.lfw import main
    root = _subset(tmp_path, 2, 2)  # 8 pairs: equal scores need equal embeddings; ncnn runs one image at a time
    common = ['--model', 'mobilefacenet', '--data', str(root), '--no-progress', '-b', '20', '-j', '0']
    ours = main(common + ['--checkpoint', str(PARAMS)])
    art = main(common + ['--runtime', 'ncnn', '--artifact', str(MFN_DIR / 'mobilefacenet.param'), '--raw-pixels'])
    assert art['accuracy'] == ours['accuracy'] and art['thresholds'] == ours['thresholds']
    assert abs(art['xnorm'] - ours['xnorm']) < 1e-3 and art['preprocessing']['pixels'] == '0..255'
    # the same artifact fed normalized input (the mistake --raw-pixels exists for) is refused, not scored
    with pytest.raises(SystemExit) as e:
        main(common + ['--runtime', 'ncnn', '--artifact', str(MFN_DIR / 'mobilefacenet.param')])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert 'normalizes its input inside' in err and 'Traceback' not in err


def test_bad_mxnet_checkpoint_is_one_line_and_writes_nothing(tmp_path, capsys):
    from eval.lfw import main as lfw_main
    from timm_mobileone.export import main as export_main
    bad = tmp_path / 'model-0000.params'
    bad.write_bytes(F.mxnet_params_bytes(F.MXNET_VALID)[:-30])
    pack = tmp_path / 'p.bin'
    pack.write_bytes(F.pack_bytes())
    for main, argv, out in (
            (lfw_main, ['--model', 'mobilefacenet', '--checkpoint', str(bad), '--data', str(pack),
                        '--results-file', str(tmp_path / 'r.json')], tmp_path / 'r.json'),
            (export_main, ['--model', 'mobilefacenet', '--checkpoint', str(bad), '--out', str(tmp_path / 'm.onnx')],
             tmp_path / 'm.onnx')):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith('error: ') and err.count('\n') == 1, err
        assert 'truncated or corrupt' in err and not out.exists()
