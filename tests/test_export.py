"""ONNX export of the fused form, INT8 quantization, and the verification eval on the ONNX artifacts."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import timm
from eval import lfw
from timm_mobileone import export
from timm_mobileone.deploy import formats

from helpers import calibrated_checkpoint, needs_modules, run_main

pytestmark = needs_modules('onnx', 'onnxruntime')
TINY = 'mobileone_112_test'  # where the export machinery, not S0's architecture, is under test


@pytest.fixture(scope='module')
def pack(face_pack):
    return face_pack


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """S0 with BN statistics calibrated on 8 face-like crops (fresh-init statistics make the outputs meaningless)."""
    return calibrated_checkpoint(tmp_path_factory.mktemp('calib'), 'mobileone_112_s0', images=8)


@pytest.fixture(scope='module')
def exported(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp('onnx') / 's0.onnx'
    result = export.main(['--model', 'mobileone_112_s0', '--checkpoint', str(checkpoint), '--onnx', str(out),
                          '--dynamic-batch'])
    return out, result


@pytest.fixture(scope='module')
def quantized(pack, tmp_path_factory):
    """INT8 of a fresh-init tiny model (no trained weights exist here; the INT8 machinery is under test: cosine mean /
    min 0.995-0.999 / 0.993-0.998 over seeds, a fresh-init S0's 0.995 / 0.994). Random weights with data-calibrated
    BN statistics make S0 a chaotic network whose INT8 cosine is ~0.46 whatever the calibration: not a property of
    trained models."""
    out = tmp_path_factory.mktemp('onnx') / 'tiny_fresh.onnx'
    result = export.main(['--model', TINY, '--onnx', str(out), '--int8', '--calib', str(pack),
                          '--calib-images', '24', '--heldout-images', '16'])
    return out, result


def _node_ops(path):
    import onnx
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_fused_graph_holds_only_plain_ops(exported):
    path, result = exported
    ops = _node_ops(path)
    assert 'BatchNormalization' not in ops and 'Add' not in ops and 'Sum' not in ops
    assert set(ops) <= formats.ALLOWED_ONNX_OPS
    assert ops.count('Conv') == 1 + 2 * 21 + 1  # stem, one conv per block, the GDC conv
    assert result['max_rel_err'] <= 1e-4


def test_onnx_runtime_matches_pytorch_with_dynamic_batch(exported, checkpoint):
    path, _ = exported
    fused = timm.utils.reparameterize_model(
        timm.create_model('mobileone_112_s0', checkpoint_path=str(checkpoint)).eval())
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        ref = fused(x).numpy()
    got = formats.ort_run(formats.ort_session(str(path)), x.numpy())
    assert got.shape == (3, 512)
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-4


def test_int8_model_is_quantized_and_close(quantized):
    _, result = quantized
    q = result['int8']
    assert Path(q['onnx']).is_file()
    assert 'QuantizeLinear' in q['ops'] and 'DequantizeLinear' in q['ops']
    # per-channel weights: the weight DequantizeLinear nodes carry one scale per output channel
    import onnx
    model = onnx.load(q['onnx'])
    inits = {i.name: i for i in model.graph.initializer}
    per_channel = [n for n in model.graph.node if n.op_type == 'DequantizeLinear' and n.input[1] in inits
                   and len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1]
    assert per_channel
    assert q['heldout_images'] == 16 and q['calib_images'] == 24
    assert q['cosine_mean'] >= 0.99 and q['cosine_min'] >= 0.98  # on held-out images
    assert q['latency_ms_int8'] > 0 and q['latency_ratio'] > 0


def test_eval_on_onnx_artifacts_matches_pytorch(exported, quantized, checkpoint, pack, capsys):
    path, _ = exported
    common = ['--data', str(pack), '--workers', '0', '--no-progress', '--batch-size', '8']
    torch_run = lfw.main(common + ['--checkpoint', str(checkpoint)])
    onnx_run = lfw.main(common + ['--onnx', str(path)])
    assert onnx_run['onnx'] == str(path) and onnx_run['reparam'] is False
    # the result names the artifact it scored (path, sha256), not the model whose input cfg it was given
    from timm_mobileone.files import sha256_file
    assert onnx_run['model'] is None and onnx_run['tag'] is None and onnx_run['artifact'] == str(path)
    assert onnx_run['artifact_sha256'] == sha256_file(path) and onnx_run['input_cfg_from'] == 'mobileone_112_s0'
    assert onnx_run['accuracy'] == torch_run['accuracy']
    assert onnx_run['xnorm'] == pytest.approx(torch_run['xnorm'], rel=1e-4)
    int8_run = lfw.main(common + ['--onnx', quantized[1]['int8']['onnx']])
    assert int8_run['num_pairs'] == 20


def test_fixed_batch_onnx_runs_image_by_image(quantized, pack):
    out, _ = quantized  # the FP32 file beside the INT8 one: exported without --dynamic-batch
    assert formats.ort_session(str(out)).get_inputs()[0].shape[0] == 1
    run = lfw.main(['--data', str(pack), '--workers', '0', '--no-progress', '--onnx', str(out)])
    assert run['num_pairs'] == 20


@pytest.mark.parametrize('argv, match', [
    (['--model', TINY, '--onnx', 'x.onnx', '--int8'], '--int8 needs --calib'),
    (['--model', TINY, '--onnx', 'x.onnx', '--int8', '--calib', 'nope/'], 'no such file or folder'),
    (['--model', 'nope', '--onnx', 'x.onnx'], "cannot create model 'nope'"),
    (['--model', TINY, '--checkpoint', 'no.pth', '--onnx', 'x.onnx'], 'no.pth: no such file'),
])
def test_export_user_errors(argv, match, tmp_path):
    proc = run_main('timm_mobileone.export', *argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith('[torch.onnx]')]
    assert len(lines) == 1 and match in lines[0] and 'Traceback' not in proc.stderr
    assert proc.stdout == ''


def test_eval_onnx_missing_file_exits_2(tmp_path, pack):
    proc = run_main('eval.lfw', '--data', pack, '--onnx', tmp_path / 'x.onnx')
    assert proc.returncode == 2 and 'x.onnx: no such file' in proc.stderr


def test_export_json_is_the_only_stdout_and_se_ops_the_only_extra(tmp_path, capfd):
    """All of stdout, file descriptor 1 included (the converters' C++ parts write there), is the one JSON object (in
    a fresh process: tests/test_wheel.py). The tiny model's SE blocks (S4 has them too) fuse to SE ops only: no
    BatchNormalization, no Add of branches (S0's graph: test_fused_graph_holds_only_plain_ops)."""
    out = tmp_path / 'tiny.onnx'
    result = export.main(['--model', TINY, '--onnx', str(out)])
    assert json.loads(capfd.readouterr().out) == json.loads(json.dumps(result))
    ops = set(_node_ops(out))
    assert result['ops'] == ['Conv', 'Gemm', 'Mul', 'ReduceMean', 'Relu', 'Reshape', 'Sigmoid'] == sorted(ops)
    assert {'Sigmoid', 'Mul'} <= ops and 'BatchNormalization' not in ops and 'Add' not in ops
    assert ops <= formats.ALLOWED_ONNX_OPS and result['max_rel_err'] <= 1e-4


def test_fp32_acceptance_gates_on_cosine_and_a_reordering_proof_bound(tmp_path, monkeypatch, capsys):
    """Float32 reordering (other kernels, other summation orders) moves outputs by ~1e-4 of their largest value and
    must pass; a conversion bug moves them by far more and must fail, leaving no file."""
    real_run = formats.ort_run

    def perturbed(scale):
        def run(session, x):
            out = real_run(session, x)
            return out + scale * np.abs(out).max() * np.sign(np.random.default_rng(0).standard_normal(out.shape))
        return run
    argv = ['--model', TINY, '--onnx', str(tmp_path / 'a.onnx')]
    monkeypatch.setattr(formats, 'ort_run', perturbed(2e-4))  # like ncnn's 1.2e-4 on a random-BN S0: accepted
    result = export.main(argv)
    assert 1e-4 < result['max_rel_err'] <= 1e-3 and result['min_cosine'] >= 0.99999
    monkeypatch.setattr(formats, 'ort_run', perturbed(2e-2))  # a bug's size: refused, nothing left
    (tmp_path / 'a.onnx').unlink()
    with pytest.raises(SystemExit) as e:
        export.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'limit 0.001' in err and 'cosine' in err and not (tmp_path / 'a.onnx').exists()


def test_int8_without_calib_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export.main(['--model', 'mobileone_112_s0', '--onnx', str(tmp_path / 'x.onnx'), '--int8'])
    assert e.value.code == 2 and '--calib' in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_converters_print_nothing_to_a_cli_that_logs_at_info(tmp_path, caplog):
    """train.compare_blocks logs at INFO: the ONNX export and INT8 quantization under it must not add onnxscript's /
    onnx_ir's per-pass lines ("unused_removal: Removed 1 unused nodes") to its stderr."""
    import logging
    caplog.set_level(logging.INFO)
    model = timm.create_model(TINY, inference_mode=True).eval()
    formats.export_onnx(model, str(tmp_path / 'a.onnx'))
    formats.quantize_int8(str(tmp_path / 'a.onnx'), str(tmp_path / 'a_int8.onnx'),
                          np.random.default_rng(0).standard_normal((2, 3, 112, 112)).astype(np.float32))
    assert (tmp_path / 'a_int8.onnx').is_file()
    noisy = [r.name for r in caplog.records if r.name.startswith(('onnx_ir', 'onnxscript', 'torch.onnx'))]
    assert not noisy, sorted(set(noisy))
    assert logging.getLogger('onnx_ir').level == logging.NOTSET  # restored afterwards


def test_deploy_table_int8_onnx_column_runs_the_quantized_model(tmp_path):
    """The deploy table's ONNX Runtime INT8 column times a QDQ model quantized from the FP32 export, not the FP32
    one."""
    from timm_mobileone.deploy import runtimes
    from timm_mobileone.__main__ import _calibrate
    torch.manual_seed(0)
    fused = timm.utils.reparameterize_model(_calibrate(timm.create_model(TINY), (3, 112, 112)))
    x = torch.randn(1, 3, 112, 112)
    outs = {}
    for column in ('onnx_fp32', 'onnx_int8'):
        (tmp_path / column).mkdir()
        outs[column] = runtimes._runner(column, fused, x, tmp_path / column)()
    assert runtimes.LABELS['onnx_int8'] == 'ONNX Runtime INT8'
    assert 'QuantizeLinear' in formats.onnx_ops(str(tmp_path / 'onnx_int8' / 'model_int8.onnx'))
    assert outs['onnx_int8'].shape == outs['onnx_fp32'].shape == (1, 512)
    assert not np.allclose(outs['onnx_int8'], outs['onnx_fp32'])
    assert formats.cosine(outs['onnx_int8'], outs['onnx_fp32']).min() > 0.5


def test_calibration_folder_skips_hidden_files_and_keeps_its_order(tmp_path):
    """--calib DIR reads the crops as eval and train.face list them: recursively, in sorted order, hidden files
    left out (macOS writes an undecodable AppleDouble `._x.jpg` beside each crop copied from its disks)."""
    from train.synthetic import identity_images, write_image_folder
    folder = write_image_folder(tmp_path / 'calib', identity_images(2, 3, seed=3))
    (folder / 'id_000' / '._00000.jpg').write_bytes(b'\x00\x05\x16\x07 not a jpeg')
    x = export.load_face_images(str(folder), (3, 112, 112), (0.5,) * 3, (0.5,) * 3, limit=100)
    first = export.load_face_images(str(folder / 'id_000'), (3, 112, 112), (0.5,) * 3, (0.5,) * 3, limit=100)
    assert x.shape == (6, 3, 112, 112) and np.isfinite(x).all()
    assert np.array_equal(x[:3], first)  # id_000's crops first, in their order
