"""Hostile input: every reader refuses broken files with its own error and one line (Hypothesis properties).

The properties live in benchmarks/fuzz_targets.py, shared with benchmarks/fuzz_soak.py, which runs them for many
minutes and the CLIs end to end. Here: a few dozen examples per format, derandomized (the same inputs on every CI
run), plus every truncation of a real pack and the regressions the soak found.
"""
import resource
import struct
import time

import numpy as np
import pytest

from benchmarks import fuzz_targets as F
from helpers import needs_modules

pytestmark = needs_modules('hypothesis')  # imported by the tests (fuzz_targets._Strategies says why)

# derandomized, so the same inputs on every run; the depth is benchmarks/fuzz_soak.py's (minutes per reader)
EXAMPLES = {'bin_pack': 125, 'image': 75, 'pairs_txt': 100, 'recordio': 100, 'checkpoint': 125, 'npy': 125,
            'ijb_meta': 100, 'mxnet_params': 125, 'photo_modes': 60, 'align_paths': 40,
            'cfp_protocol': 75, 'gallery': 100}
SLOWEST_EXAMPLE_S = 10.0  # generous: a shared 2-core machine; a hang or a quadratic blow-up is far above it
GROWTH_MB = 300  # no example may raise the process's peak RSS by more than this


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize('name', sorted(F.TARGETS))
def test_reader_refuses_broken_input_cleanly(name, tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    target = F.TARGETS[name]
    strategy = target.strategy()
    start_peak = _peak_mb()
    seen = {'accepted': 0, 'refused': 0}

    @settings(max_examples=EXAMPLES[name], deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def prop(example):
        folder = tmp_path_factory.mktemp(name)
        t0 = time.perf_counter()
        seen[F.outcome(target, folder, example)] += 1
        assert time.perf_counter() - t0 < SLOWEST_EXAMPLE_S
        assert _peak_mb() - start_peak < GROWTH_MB

    prop()
    assert seen['refused'] > 0  # the strategy really produces broken files


def test_every_truncation_of_a_real_pack_is_refused(tmp_path):
    from timm_mobileone.verification_data import PackError, load_pack
    for data in (F.pack_bytes(2, 'array', 4), F.pack_bytes(2, 'bytes', 2)):
        path = tmp_path / 'p.bin'
        for cut in range(len(data)):
            path.write_bytes(data[:cut])
            with pytest.raises(PackError):
                load_pack(path)
        path.write_bytes(data)
        assert load_pack(path).num_pairs == 2


# ----------------------------------------------------------------------------------------------------------------
# regressions: one per input that broke a reader, named after it


def test_truncated_safetensors_checkpoint_is_one_line_for_eval(tmp_path):
    # `eval.lfw --checkpoint` on a truncated safetensors file ended in a safetensors traceback
    from timm_mobileone.checkpoints import create_model_checked
    from timm_mobileone.errors import UserError
    path = tmp_path / 'ck.safetensors'
    path.write_bytes(F.safetensors_bytes()[:40])
    with pytest.raises(UserError, match='ck.safetensors: cannot be read'):
        create_model_checked('mobileone_112_s0', checkpoint=str(path))


def test_png_declaring_100000x100000_is_refused_before_decoding():
    # Pillow raises DecompressionBombError (not an OSError) above 2x MAX_IMAGE_PIXELS and decodes below it
    from timm_mobileone.verification_data import ImageError, decode_aligned
    before = _peak_mb()
    with pytest.raises(ImageError, match='decompression bomb'):
        decode_aligned(F.png_declaring(100000, 100000), (112, 112))
    with pytest.warns(Warning), pytest.raises(ImageError, match='is 12000x12000'):  # 144M pixels: only a warning
        decode_aligned(F.png_declaring(12000, 12000), (112, 112))
    assert _peak_mb() - before < 50


def test_npy_declaring_10e12_elements_is_refused_before_allocating(tmp_path):
    from timm_mobileone.verification_data import PackError, read_embeddings
    path = tmp_path / 'e.npy'
    path.write_bytes(F.npy_with_header({'descr': '<f4', 'fortran_order': False, 'shape': (10 ** 12, 2)}, b'\0' * 64))
    with pytest.raises(PackError, match='declares shape'):
        read_embeddings(path, 3)


def test_recordio_length_of_500mb_is_refused_before_reading(tmp_path):
    from train.recordio import MAGIC, RecordIOError, RecordIOReader
    (tmp_path / 'train.rec').write_bytes(struct.pack('<II', MAGIC, 500 << 20) + b'\0' * 64)
    (tmp_path / 'train.idx').write_text('0\t0\n')
    with pytest.raises(RecordIOError, match='declares 524288000 bytes'):
        RecordIOReader(tmp_path / 'train.rec').read(0)


def test_recordio_record_with_nan_label_is_an_item_error_not_a_traceback(tmp_path):
    from train import recordio
    from train.data import open_dataset
    payloads = [recordio.pack(2, [2, 3], 0, 0, b''), recordio.pack(0, float('nan'), 1, 0, F.tiny_jpeg()),
                recordio.pack(2, [1, 2], 2, 0, b'')]
    recordio.write_records(tmp_path / 'train.rec', payloads)
    (tmp_path / 'property').write_text('1,112,112')
    _, _, error = open_dataset(tmp_path, (112, 112))[0]
    assert 'label nan is outside the identity range' in error


def test_recordio_header_with_more_labels_than_bytes_is_refused(tmp_path):
    from train import recordio
    from train.data import FaceDataError, open_dataset
    head = recordio.pack(2, [2, 2], 0, 0, b'')  # no identity range: counting identities reads every label
    bad = struct.pack('<IfQQ', 1000, 0.0, 0, 0) + b'\0' * 8  # 1000 labels declared, 2 present
    recordio.write_records(tmp_path / 'train.rec', [head, bad])
    with pytest.raises(FaceDataError, match='declares 1000 labels'):
        open_dataset(tmp_path, (112, 112))  # no property file: counting identities reads every label


def test_recordio_continuation_flags_that_never_end_stop_at_the_file_end(tmp_path):
    from train.recordio import MAGIC, RecordIOError, RecordIOReader
    first = struct.pack('<II', MAGIC, (1 << 29) | 4) + b'abcd'
    middle = struct.pack('<II', MAGIC, (2 << 29) | 4) + b'efgh'
    (tmp_path / 'train.rec').write_bytes(first + middle * 1000)  # "more parts follow", to the last byte
    (tmp_path / 'train.idx').write_text('0\t0\n')
    with pytest.raises(RecordIOError, match='truncated record'):
        RecordIOReader(tmp_path / 'train.rec').read(0)


def test_recordio_index_offset_outside_the_file_names_the_index(tmp_path):
    from train.recordio import RecordIOError, RecordIOReader
    (tmp_path / 'train.rec').write_bytes(b'\0' * 16)
    for offset, match in ((-8, 'is negative; is train.idx the index'), (10 ** 12, 'or train.idx is not the index')):
        (tmp_path / 'train.idx').write_text(f'0\t{offset}\n')
        with pytest.raises(RecordIOError, match=match):
            RecordIOReader(tmp_path / 'train.rec').read(0)


def test_pairs_txt_that_is_not_utf8_is_one_line(tmp_path):
    from timm_mobileone.verification_data import PackError, load_pairs_folder
    (tmp_path / 'pairs.txt').write_bytes(b'Alice 1 2\n\xc3\x28 1 2\n')
    with pytest.raises(PackError, match='not UTF-8'):
        load_pairs_folder(tmp_path)


def test_ijb_features_file_declaring_more_than_it_holds(tmp_path):
    from timm_mobileone.verification_data import PackError, read_npy
    path = tmp_path / 'f.npy'
    path.write_bytes(F.npy_with_header({'descr': '<f4', 'fortran_order': False, 'shape': (469375, 2, 512)}, b''))
    with pytest.raises(PackError, match='truncated or corrupt'):
        read_npy(path, '--features', mmap=True)
    assert np.load(F.io.BytesIO(F.npy_bytes())).shape == (6, 8)


@pytest.fixture(scope='module')
def fresh_process(tmp_path_factory):
    """The inputs that crashed the process itself (SIGSEGV), read in one fresh interpreter, several times each, so
    that a crash fails the tests instead of killing the suite; one interpreter for both (a Python + torch start is
    seconds): each line of its output is '<case>: <what the reader said>'. A crash fails both tests."""
    import subprocess
    import sys
    folder = tmp_path_factory.mktemp('crashers')
    ijb = folder / 'ijbc_template_pair_label.txt'
    ijb.write_bytes(b'5 3 \xf1\xa5\x95\x8e\xc3\xa9\xc2\x9b\xf0\xa0\x88\x92\xc3\xaa -inf 9223372036854775807\n')
    pack = F.REPO / 'tests' / 'data' / 'pack_numpy_setstate_segfault.bin'
    code = ('import sys; from pathlib import Path; from eval._ijb import read_pairs\n'
            'from timm_mobileone.verification_data import PackError, load_pack\n'
            'for _ in range(5):\n    try: read_pairs(Path(sys.argv[1]))\n    except PackError as e: print("ijb:", e)\n'
            'for _ in range(3):\n    try: print("pack:", load_pack(sys.argv[2]).num_pairs)\n'
            '    except PackError as e: print("pack: refused")')
    proc = subprocess.run([sys.executable, '-c', code, str(ijb), str(pack)], cwd=F.REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-500:]
    return proc.stdout.splitlines()


def test_ijb_pair_list_with_non_ascii_field_is_one_line_not_a_segfault(fresh_process):
    # numpy 2.4's loadtxt crashed the process (SIGSEGV, about one run in three) on this line (read 5 times)
    said = [line for line in fresh_process if line.startswith('ijb: ')]
    assert len(said) == 5 and all('expected 3 fields' in line for line in said), fresh_process


def test_npy_header_with_an_unclosed_bracket_is_one_line(tmp_path):
    # the soak's first find: numpy parses old-style .npy headers with Python's tokenizer, which raised TokenError
    from timm_mobileone.verification_data import PackError, read_npy
    path = tmp_path / 'e.npy'
    data = bytearray(F.npy_bytes())
    data[110] = ord('[')  # in the header's padding: an unclosed bracket
    path.write_bytes(bytes(data))
    with pytest.raises(PackError, match='not a .npy array'):
        read_npy(path)


CHECKPOINT_MODEL = 'mobileone_112_test'  # tiny: the checks are per tensor (names, shapes, dtypes), not per variant


@pytest.fixture(scope='module')
def model_state_dict():
    import timm
    import timm_mobileone  # noqa: F401
    return timm.create_model(CHECKPOINT_MODEL).state_dict()


def test_checkpoint_with_wrong_shapes_or_dtypes_is_one_line(model_state_dict, tmp_path_factory):
    # a real model's state dict with tensors of other shapes and dtypes, for every --checkpoint and for hub export
    import torch
    from hypothesis import HealthCheck, given, settings, strategies as st
    from safetensors.torch import save_file
    from timm_mobileone import hub
    from timm_mobileone.checkpoints import create_model_checked
    from timm_mobileone.errors import UserError
    keys = sorted(k for k, v in model_state_dict.items() if v.is_floating_point())
    dtypes = [torch.float16, torch.float64, torch.int8, torch.bool, torch.complex64, torch.uint8]

    @settings(max_examples=12, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(keys), st.one_of(st.sampled_from(dtypes).map(lambda d: ('dtype', d)),
                                            st.lists(st.integers(0, 9), max_size=4).map(lambda s: ('shape', s))),
           st.sampled_from(['.safetensors', '.pth']))
    def prop(key, change, suffix):
        state = dict(model_state_dict)
        kind, value = change
        state[key] = state[key].to(value) if kind == 'dtype' else torch.zeros(value)
        path = tmp_path_factory.mktemp('ck') / f'ck{suffix}'
        if suffix == '.safetensors':
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        else:
            torch.save(state, path)
        try:
            create_model_checked(CHECKPOINT_MODEL, checkpoint=str(path))
        except UserError as e:
            assert '\n' not in str(e).strip()
        try:
            hub._load_checked(CHECKPOINT_MODEL, str(path))
        except UserError as e:
            assert '\n' not in str(e).strip()

    prop()


@pytest.mark.parametrize('name, data', [
    # found by benchmarks/fuzz_soak.py: a pack whose _codecs.encode call names an unknown codec (LookupError)
    ('codec_lookup_error', b'\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00abX\x05\x00\x00\x00lat1q\x86R.'),
    # pickle's own message for a persistent id holds a newline
    ('persistent_id', b'\x80\x04K\x01Q.'),
    # a refused global whose module name holds a newline
    ('newline_in_module_name', b'\x80\x04\x8c\x05nu\nmp\x94\x8c\x06system\x94\x93.'),
])
def test_pack_errors_are_one_line(name, data, tmp_path):
    from timm_mobileone.verification_data import PackError, load_pack
    path = tmp_path / f'{name}.bin'
    path.write_bytes(data)
    with pytest.raises(PackError) as e:
        load_pack(path)
    assert '\n' not in str(e.value)


def test_ijb_media_id_of_2_to_the_64_is_one_line(tmp_path):
    # found by benchmarks/fuzz_soak.py: an id past int64 in *_face_tid_mid.txt raised OverflowError
    from eval._ijb import read_template_media
    from timm_mobileone.verification_data import PackError
    path = tmp_path / 'ijbc_face_tid_mid.txt'
    path.write_text('1.jpg 3 100\n2.jpg 3 18446744073709551616\n')
    with pytest.raises(PackError, match='ijbc_face_tid_mid.txt:2: media id .* is out of range'):
        read_template_media(path)


def test_pack_declaring_10e12_labels_is_refused_before_allocating(tmp_path):
    import pickle
    from timm_mobileone.verification_data import PackError, load_pack
    data = pickle.dumps(([np.zeros(2, np.uint8)] * 2, np.zeros(1, bool)), protocol=2)
    i = data.rfind(b'K\x01\x85')  # the issame array's shape (1,)
    path = tmp_path / 'big.bin'
    path.write_bytes(data[:i] + b'\x8a\x05' + (10 ** 12).to_bytes(5, 'little') + b'\x85' + data[i + 3:])
    before = _peak_mb()
    with pytest.raises(PackError, match='not an insightface .bin pack'):
        load_pack(path)
    assert _peak_mb() - before < 50


def test_pairs_txt_with_a_300_character_name_is_one_line(tmp_path):
    # found by the CI property: pathlib's is_file() raises ENAMETOOLONG instead of returning False
    from timm_mobileone.verification_data import PackError, load_pairs_folder
    (tmp_path / 'pairs.txt').write_text('a' * 300 + ' 0 0\n')
    with pytest.raises(PackError, match='pairs.txt:1: no image'):
        load_pairs_folder(tmp_path)


def test_recordio_index_with_a_key_of_2_to_the_64_is_one_line(tmp_path):
    # found by benchmarks/fuzz_soak.py: the .idx fallback parser raised OverflowError
    from train.recordio import RecordIOError, RecordIOReader
    (tmp_path / 'train.rec').write_bytes(b'\0' * 16)
    # '1_0' is an int to Python, not to numpy's fast parser: the line-by-line parser takes over
    (tmp_path / 'train.idx').write_text('0\t0\n1_0\t8\n18446744073709551616\t8\n')
    with pytest.raises(RecordIOError, match='train.idx:3: key or offset out of range'):
        RecordIOReader(tmp_path / 'train.rec')


def test_pack_that_crashed_numpy_setstate_loads_in_a_fresh_process(fresh_process):
    # found by benchmarks/fuzz_soak.py: a mutated pack (tests/data/pack_numpy_setstate_segfault.bin) killed the
    # process with a segmentation fault inside numpy's C __setstate__; packs now build arrays with checked stand-ins
    said = [line for line in fresh_process if line.startswith('pack: ')]
    assert len(said) == 3 and all(len(line.split()) == 2 for line in said), fresh_process


def test_pack_arrays_are_built_only_from_checked_state(tmp_path):
    import pickle
    from timm_mobileone.verification_data import PackError, load_pack
    path = tmp_path / 'p.bin'
    for bins in ([np.zeros(4, np.float64)] * 2, [np.zeros(4, np.int32)] * 2):  # dtypes no pack holds
        path.write_bytes(pickle.dumps((bins, [True]), protocol=2))
        with pytest.raises(PackError, match='is not one a pack holds'):
            load_pack(path)
    data = pickle.dumps(([np.zeros(4, np.uint8)] * 2, [True]), protocol=4)
    path.write_bytes(data.replace(b'\x00' * 4, b'\x00' * 3, 1))  # 3 data bytes for shape (4,)
    with pytest.raises(PackError):
        load_pack(path)


# ----------------------------------------------------------------------------------------------------------------
# CFP's protocol text (eval._photos.read_cfp, `python -m eval.cfp --data <CFP root>`): one `error:` line, exit 2,
# before any photo is aligned; each was a traceback (or, for '٣' and a lone fold, no error at all)


def _cfp_root(tmp_path, folds, edits):
    files = dict(F.cfp_files(folds), **edits)  # {path under the root: bytes}
    root = tmp_path / 'cfp'
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


SAME_FP_01 = 'Protocol/Split/FP/01/same.txt'


@pytest.mark.parametrize('folds, edits, message', [
    # '²'.isdigit() is True, int('²') a ValueError
    (2, {SAME_FP_01: '1,1\n²,2\n'.encode()}, 'FP/01/same.txt:2: expected "A,B" (two image numbers, digits 0-9), '
                                             "got '²,2'"),
    (2, {'Protocol/Pair_list_F.txt': '1 ../a.jpg\n² ../b.jpg\n'.encode()},
     'Pair_list_F.txt:2: expected "NUMBER PATH" (NUMBER in digits 0-9), got \'² ../b.jpg\''),
    # int('٣') is 3: the line was read as another image's
    (2, {SAME_FP_01: '1,1\n٣,3\n'.encode()}, 'FP/01/same.txt:2: expected "A,B"'),
    # a NUL in a path: ValueError (embedded null byte) from the path's resolve()
    (2, {'Protocol/Pair_list_P.txt': b'1 ../Data/a\x00.jpg\n2 ../Data/b.jpg\n'},
     "Pair_list_P.txt:1: the path '../Data/a\\x00.jpg' holds a control character"),
    # any other control character: was read as a photo's name ('no such photo' at alignment)
    (2, {'Protocol/Pair_list_P.txt': b'1 ../Data/b.jpg\n2 ../Data/a\x1b[1m.jpg\n'},
     "Pair_list_P.txt:2: the path '../Data/a\\x1b[1m.jpg' holds a control character"),
    # int() refuses 4,300 digits, leading zeros included
    (2, {SAME_FP_01: ('1' * 5000 + ',1\n').encode()}, 'FP/01/same.txt:1: image number 111111111111... (5000 digits) '
                                                    'is out of range'),
    # every split file empty: numpy's AxisError when scoring
    (2, {f'Protocol/Split/FP/{k:02d}/{kind}.txt': b'' for k in (1, 2) for kind in ('same', 'diff')},
     'Split/FP: no pairs (every same.txt and diff.txt of its 2 folds is empty)'),
    # one fold: "num_folds must be >= 2" from the metric, after aligning every photo
    (1, {}, "Split/FP: one fold folder ('01'); cross-validation needs at least 2"),
    # a number listed twice: the later line silently won
    (2, {'Protocol/Pair_list_F.txt': b'1 ../a.jpg\n2 ../b.jpg\n1 ../c.jpg\n'},
     'Pair_list_F.txt:3: image 1 is listed again (first on line 1)'),
], ids=['superscript_in_split', 'superscript_in_pair_list', 'arabic_indic_digit', 'nul_in_path', 'escape_in_path',
        '5000_digits', 'every_split_empty', 'one_fold', 'number_listed_twice'])
def test_cfp_protocol_text_is_one_line_before_alignment(folds, edits, message, tmp_path, capsys):
    from eval import cfp
    root = _cfp_root(tmp_path, folds, edits)
    cache = tmp_path / 'cache'
    with pytest.raises(SystemExit) as e:
        cfp.main(['--data', str(root), '--protocol', 'FP', '--align-cache', str(cache), '--workers', '0'])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == '' and err.startswith('error: ') and err.count('\n') == 1, err
    assert message in err, err
    assert not cache.exists()  # refused while reading the protocol: nothing aligned, no cache made


def test_cfp_protocol_with_a_bom_and_crlf_line_ends_reads(tmp_path):
    # as a Windows editor saves it; line numbers count '\n' only (form feeds, U+2028 and the like split no line)
    from eval.api import read_cfp_pairs as read_cfp
    from timm_mobileone.verification_data import PackError
    files = {name: b'\xef\xbb\xbf' + data.replace(b'\n', b'\r\n') for name, data in F.cfp_files(2).items()}
    root = _cfp_root(tmp_path, 2, files)
    images, issame, folds = read_cfp(root, 'FP')
    assert folds == 2 and issame.tolist() == [True, True, False, False] * 2 and len(images) == 16
    assert images[:2] == ['Data/Images/001/frontal/01.jpg', 'Data/Images/001/profile/01.jpg']
    (root / SAME_FP_01).write_bytes('1,1\u2028\x0c\n2,²\n'.encode())
    with pytest.raises(PackError, match=r'FP/01/same.txt:2: expected "A,B"'):
        read_cfp(root, 'FP')
