"""On-device formats: ExecuTorch (XNNPACK FP32 and INT8) and ncnn run here and match PyTorch; Core ML's spec;
insightface's model zoo as a real client of the ONNX export; what bad input gets.

The formats' machinery is under test, on the tiny `mobileone_112_test` (its SE blocks are S4's; a fraction of S0's
conversion time); every real variant in every format, against the same FP32 gates: benchmarks/deploy_check.py."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import timm
from timm_mobileone import export
from timm_mobileone.deploy import formats
from timm_mobileone.errors import UserError

from helpers import calibrated_checkpoint, needs_modules

# coremltools imports executorch.exir: 5 s per xdist worker at collection
pytestmark = needs_modules('executorch', 'ncnn', 'coremltools', hint=' (the [deploy] extra)')


TINY = 'mobileone_112_test'


def _export(_, *argv, capsys=None):
    result = export.main(['--model', TINY, *argv])
    if capsys is not None:
        assert json.loads(capsys.readouterr().out) == result  # one JSON object is all of stdout
    return result


def _fused(checkpoint):
    model = timm.create_model(TINY)
    model.load_state_dict(torch.load(checkpoint))
    return timm.utils.reparameterize_model(model.eval())


@pytest.fixture(scope='module')
def calibrated_tiny(tmp_path_factory):
    """The tiny model with BN statistics calibrated on 32 face-like crops."""
    return calibrated_checkpoint(tmp_path_factory.mktemp('calib'), TINY)


@pytest.fixture(scope='module')
def heldout_args(face_pack):
    return ['--calib', str(face_pack), '--calib-images', '24', '--heldout-images', '16']


@pytest.fixture(scope='module')
def pte(calibrated_tiny, heldout_args, tmp_path_factory):
    path = tmp_path_factory.mktemp('et') / 'tiny.pte'
    return path, _export(None, '--checkpoint', str(calibrated_tiny), '--format', 'executorch', '--out', str(path),
                         *heldout_args)


@pytest.fixture(scope='module')
def ncnn_param(calibrated_tiny, heldout_args, tmp_path_factory):
    # `--out tiny` (no suffix) writes tiny.param + tiny.bin, as `--out tiny.param` does
    path = tmp_path_factory.mktemp('ncnn') / 'tiny'
    result = _export(None, '--checkpoint', str(calibrated_tiny), '--format', 'ncnn', '--out', str(path),
                     *heldout_args)
    return path.with_name('tiny.param'), result


def test_executorch_fp32_and_int8_run_and_match(pte, calibrated_tiny, heldout_args, tmp_path, capsys):
    path, fp32 = pte
    assert fp32['ran'] and fp32['batch'] == 1 and fp32['not_delegated'] == [] and fp32['delegates'] >= 1
    assert fp32['max_rel_err'] <= 1e-4 and fp32['min_cosine'] >= 0.99999
    assert fp32['inputs'].startswith('16 held-out face crops')
    assert fp32['size_bytes'] == path.stat().st_size
    # INT8 of the same data-calibrated weights: the tiny model quantizes to cosines ~0.9999 (S0 with data-calibrated
    # BN statistics is chaotic and quantizes far below (README, Deployment), which says nothing of trained weights;
    # the fresh-init tiny model's cosines spread 0.97-0.998 over seeds)
    int8 = _export(tmp_path, '--checkpoint', str(calibrated_tiny), '--format', 'executorch', '--int8', '--out',
                   str(tmp_path / 'tiny_int8.pte'), *heldout_args, capsys=capsys)
    assert int8['int8_vs_fp32_cosine_min'] >= 0.99
    # int8 weights: 0.35 of the FP32 program for the tiny model (S0: 0.27), 16-bit weights would be over 0.5
    assert int8['size_bytes'] < 0.4 * fp32['size_bytes']
    # the artifact runs again from the file, as an app would load it
    run = formats.executorch_runner(str(path))
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = _fused(calibrated_tiny)(x).numpy()
    assert np.abs(run(x.numpy()) - ref).max() / np.abs(ref).max() <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ['tiny_int8.pte']  # no temporary folder left


def test_ncnn_fp32_weights_and_the_fp16_runtime(ncnn_param):
    path, result = ncnn_param
    # fused: no BatchNorm; the SE blocks' Reduction, Split and gate multiply (BinaryOp op 2), no Add of branches
    assert result['layers'] == ['BinaryOp', 'Convolution', 'ConvolutionDepthWise', 'Flatten', 'InnerProduct', 'Input',
                                'ReLU', 'Reduction', 'Split']
    binary = [line.split() for line in path.read_text().splitlines() if line.startswith('BinaryOp')]
    assert len(binary) == 2 and all(f[-1] == '0=2' for f in binary), binary  # the two SE gates, multiplications
    assert result['max_rel_err'] <= 1e-4 and result['min_cosine'] >= 0.99999
    # ncnn's own fp16 default: reported beside, an order of magnitude or more further off
    assert result['fp16_runtime']['max_rel_err'] > 10 * result['max_rel_err']
    assert sorted(p.name for p in path.parent.iterdir()) == ['tiny.bin', 'tiny.param']
    assert result['path'] == str(path) and result['files'] == [str(path), str(path.with_suffix('.bin'))]


def test_a_multi_file_format_names_its_files_from_out():
    ncnn, onnx = formats.FORMATS['ncnn'], formats.FORMATS['onnx']
    for out in ('m', 'm.param', 'm.bin'):
        assert [p.name for p in ncnn.files(ncnn.artifact_path(Path(out)))] == ['m.param', 'm.bin']
    assert ncnn.artifact_path(Path('d/m.v2')) == Path('d/m.v2.param')
    assert onnx.artifact_path(Path('m')) == Path('m')  # a one-file format writes the name given


def test_eval_lfw_on_the_deployed_artifacts(pte, ncnn_param, calibrated_tiny, face_pack, capsys):
    """`eval.lfw --runtime R --artifact A`: the protocol and JSON of the PyTorch run, on exactly what ships."""
    from eval import lfw
    common = ['--data', str(face_pack), '--workers', '0', '--no-progress', '--batch-size', '8']
    ref = lfw.main(common + ['--model', TINY, '--checkpoint', str(calibrated_tiny)])
    assert ref['runtime'] == 'pytorch'
    for runtime, (path, _) in (('executorch', pte), ('ncnn', ncnn_param)):
        got = lfw.main(common + ['--runtime', runtime, '--artifact', str(path)])
        assert got['runtime'] == runtime and got['artifact'] == str(path) and got['reparam'] is False
        assert got['accuracy'] == ref['accuracy'] and got['thresholds'] == ref['thresholds'], runtime
    capsys.readouterr()


def test_coreml_spec_is_checked_not_run(calibrated_tiny, tmp_path):
    result = _export(tmp_path, '--checkpoint', str(calibrated_tiny), '--format', 'coreml', '--out',
                     str(tmp_path / 'tiny.mlpackage'))
    assert result['ran'] is False and 'macOS' in result['note'] and result['max_rel_err'] is None
    assert result['input'] == 'image' and result['input_shape'] == [1, 3, 112, 112]
    assert result['output_shape'] == [1, 512]
    ops = result['ops']
    # the image's scale and bias: one mul and one add; beyond them, one mul per SE gate (sigmoid), no add of branches
    assert 'batch_norm' not in ops and ops.get('add') == 1 and ops['sigmoid'] == 2 and ops.get('mul') == 1 + 2
    assert ops['conv'] == 1 + 2 * 4 + 1 + 2 * 2 and ops['linear'] == 1  # stem, 4 block pairs, GDC; 2 SE blocks
    assert (tmp_path / 'tiny.mlpackage' / 'Manifest.json').is_file()
    tensor = _export(tmp_path, '--checkpoint', str(calibrated_tiny), '--format', 'coreml', '--coreml-input', 'tensor',
                     '--int8', '--out', str(tmp_path / 'tiny_int8.mlpackage'))
    assert 'add' not in tensor['ops'] and tensor['ops']['mul'] == 2  # no image scale: the SE gates' muls only
    assert 'constexpr_affine_dequantize' in tensor['ops']
    assert tensor['size_bytes'] < 0.6 * result['size_bytes']  # 8-bit vs 16-bit weights


@pytest.mark.parametrize('dynamic', [False, True])
def test_insightface_model_zoo_loads_the_onnx_export(calibrated_tiny, face_pack, tmp_path, dynamic):
    """insightface's own recognition class (ArcFaceONNX, mean = std = 127.5, BGR crops) gives our eval's
    embedding for an aligned crop."""
    insightface = pytest.importorskip('insightface')
    from insightface.model_zoo import get_model
    from timm_mobileone.verification_data import PairImages, load_pack
    path = tmp_path / 'tiny.onnx'
    _export(tmp_path, '--checkpoint', str(calibrated_tiny), '--out', str(path), *(['--dynamic-batch'] * dynamic))
    rec = get_model(str(path), providers=['CPUExecutionProvider'])
    assert type(rec).__name__ == 'ArcFaceONNX' and rec.input_mean == rec.input_std == 127.5, insightface.__version__
    reader = PairImages(load_pack(face_pack), (112, 112))
    fused = _fused(calibrated_tiny)
    for i in range(3):
        _, rgb, err = reader[i]  # our eval's decoding: uint8 RGB, CHW
        assert not err
        bgr = np.ascontiguousarray(rgb.numpy().transpose(1, 2, 0)[:, :, ::-1])
        theirs = rec.get_feat(bgr)[0]
        with torch.no_grad():
            ours = fused((rgb[None].float() / 255 - 0.5) / 0.5)[0].numpy()
        assert float(theirs @ ours / np.linalg.norm(theirs) / np.linalg.norm(ours)) >= 0.9999


def test_deploy_bad_input(calibrated_tiny, face_pack, tmp_path, capsys, monkeypatch):
    def error(argv):
        with pytest.raises(SystemExit) as e:
            export.main(['--model', TINY, *argv])
        assert e.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert 'Traceback' not in '\n'.join(lines)
        return lines[-1]

    assert '--out' in error(['--format', 'executorch'])
    assert 'ncnn2table' in error(['--format', 'ncnn', '--int8', '--out', str(tmp_path / 'a.param')])
    assert '--calib' in error(['--format', 'executorch', '--int8', '--out', str(tmp_path / 'a.pte')])
    # a runtime that is not installed names the extra
    real_import = formats.importlib.import_module
    monkeypatch.setattr(formats.importlib, 'import_module',
                        lambda name: (_ for _ in ()).throw(ImportError(name)) if name == 'ncnn' else real_import(name))
    line = error(['--format', 'ncnn', '--out', str(tmp_path / 'a.param')])
    assert line.startswith('error: --format ncnn needs ncnn') and 'timm-mobileone[deploy]' in line
    monkeypatch.undo()
    # an artifact that does not compute what PyTorch computes: refused, and nothing is left behind (ncnn: neither of
    # its two files; the gate is the pipeline's, the same for every format)
    monkeypatch.setattr(export, 'compare', lambda run, fused, images: dict(max_rel_err=0.5, min_cosine=0.9,
                                                                          mean_cosine=0.9))
    line = error(['--checkpoint', str(calibrated_tiny), '--format', 'ncnn', '--out', str(tmp_path / 'b.param')])
    assert 'differs from PyTorch' in line and 'nothing written' in line
    monkeypatch.undo()
    # a corrupt program
    (tmp_path / 'bad.pte').write_bytes(b'\x00' * 64)
    with pytest.raises(UserError, match='ExecuTorch cannot load it'):
        formats.executorch_runner(str(tmp_path / 'bad.pte'))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bad.pte']
    # ... and given to the eval, with the other artifact mistakes
    from eval import lfw
    for argv, match in [(['--runtime', 'executorch'], '--runtime and --artifact go together'),
                        (['--runtime', 'ncnn', '--artifact', str(tmp_path / 'none.param')], 'no such file'),
                        (['--runtime', 'executorch', '--artifact', str(tmp_path / 'bad.pte')], 'cannot load it'),
                        (['--onnx', 'a.onnx', '--runtime', 'ncnn', '--artifact', 'a.param'], 'one or the other')]:
        with pytest.raises(SystemExit) as e:
            lfw.main(['--data', str(face_pack), '--no-progress', *argv])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and line.startswith('error: ') and match in line, line
