"""Photos in, answers out: `python -m timm_mobileone.faces compare|embed|search|demo` (needs the `[faces]` extra).

    python -m timm_mobileone.faces compare A.jpg B.jpg --model hf-hub:<repo> [--threshold 0.3 | --results eval.json]
    python -m timm_mobileone.faces embed PHOTOS/ --out gallery.npz --model ... [--dtype float16]
    python -m timm_mobileone.faces search --gallery gallery.npz --query Q.jpg -k 5 --model ...
    python -m timm_mobileone.faces demo --model ... [--threshold 0.3 | --results eval.json] [--port 7860]

Each prints one JSON object on stdout (progress on stderr); a user mistake is one `error:` line and exit code 2.

- `compare`: the cosine of the two photos' faces, and `same` at a threshold: `--threshold` (a cosine), else the one
  an eval result of this model gives (`--results FILE`, what `python -m eval.* --results-file` writes: the median of
  its folds' best thresholds), else the one a Hub / local-dir model's config.json records (`hub export --results`),
  else the cosine alone and a `note` saying why there is no answer.
- `embed`: every photo under PHOTOS (recursively) to a gallery file (`timm_mobileone.faces.gallery`: the chosen
  face's embedding, the paths, the model) and FILE.records.jsonl (each photo's status, box, score, landmarks).
  Resumable: the records and embeddings land photo by photo in FILE.partial/; a rerun embeds only what is missing,
  and the gallery is written (atomically) when every photo has a record.
- `search`: the -k nearest gallery entries of the query photo's face by cosine, exact (chunked matrix products over
  the memory-mapped gallery: no index).
- `demo`: a web page (Gradio, the `[demo]` extra) on --host:--port until Ctrl-C: two photos uploaded, each shown
  with its faces found (the compared one highlighted), the aligned crops, the cosine and the answer at the threshold
  (`compare`'s flags); `timm_mobileone.faces.demo.build_demo` is the page, for a Space's app.py.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..cli import cli
from ..errors import UserError
from ..files import atomic_write

SAME_RULE = 'same when cosine >= threshold'


def _model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('model (what embeds the faces)')
    group.add_argument('--model', default='mobileone_112_s0',
                       help="a registered model, 'hf-hub:<repo>' or 'local-dir:<folder>'; with --artifact: the "
                            "model whose input size and normalisation the artifact takes")
    group.add_argument('--checkpoint', default='', help='weights for --model (.safetensors, .pth, MXNet .params)')
    group.add_argument('--artifact', default='', help='an exported model file (ONNX, ExecuTorch .pte, ncnn .param)')
    group.add_argument('--runtime', default='', help='what runs --artifact: onnx, executorch or ncnn')
    group.add_argument('--device', default='cpu', help='torch device for --model')
    group.add_argument('--no-flip', dest='flip', action='store_false',
                       help='embed the image alone (default: image + horizontal flip, insightface\'s rule)')
    group.add_argument('-b', '--batch-size', type=int, default=32, help='faces per forward pass')
    group.add_argument('--select', default='area_score', choices=('area_score', 'largest', 'score', 'central'),
                       help='the face of a photo with several')
    group.add_argument('--score-threshold', type=float, default=0.5, help='lowest detector score kept')


def _embedder(args):
    from .embedder import FaceEmbedder
    if not 0 < args.score_threshold < 1:
        raise UserError(f'--score-threshold {args.score_threshold}: must be in (0, 1)')
    if args.model.startswith(('hf-hub:', 'local-dir:')) and args.checkpoint:
        raise UserError(f'--model {args.model} comes with its weights: --checkpoint does not apply')
    return FaceEmbedder(args.model, args.checkpoint, artifact=args.artifact, runtime=args.runtime,
                        device=args.device, flip=args.flip, batch_size=args.batch_size, select=args.select,
                        score_threshold=args.score_threshold)


def _photo_file(path: str, flag: str) -> Path:
    p = Path(path)
    if not p.is_file():
        what = 'not a regular file' if p.exists() else 'no such file'
        raise UserError(f'{flag}{" " if flag else ""}{path}: {what}')
    return p


# ----------------------------------------------------------------------------------------------------------------
# compare


def threshold_from_results(path: str) -> float:
    """The cosine threshold of an eval result (`--results-file` of eval.lfw / cfp / verify): the median of its
    verification results' fold thresholds (`timm_mobileone.results.cosine_threshold`)."""
    from ..results import cosine_threshold
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f'--results {path}: not a readable JSON file ({str(e).splitlines()[0] if str(e) else e})') \
            from None
    found: List[float] = []
    for r in (obj.get('results') if isinstance(obj, dict) and isinstance(obj.get('results'), list) else [obj]):
        t = r.get('thresholds') if isinstance(r, dict) else None
        if cosine_threshold(t) is not None:
            found += t
    if not found:
        raise UserError(f'--results {path}: no verification thresholds in it (an eval.lfw / eval.cfp / eval.verify '
                        f'--results-file holds them)')
    return cosine_threshold(found)


def _flag_threshold(args):
    """(threshold, where it came from) as the flags give it, checked before any model loads: `--threshold` (a
    cosine) or `--results` (an eval result of the model); (None, None) with neither."""
    if args.threshold is not None and args.results:
        raise UserError('--threshold and --results: give one')
    if args.threshold is not None and not -1 <= args.threshold <= 1:
        raise UserError(f'--threshold {args.threshold}: a cosine, in [-1, 1]')
    if args.results:
        return threshold_from_results(args.results), f'{args.results} (median fold threshold)'
    return args.threshold, ('given' if args.threshold is not None else None)


def _recorded_threshold(args, faces, threshold, source):
    """Without a threshold from the flags: the one a Hub / local-dir model's config.json records (`hub export
    --results`), else still none."""
    found = faces.verification
    if threshold is None and found is not None:
        return float(found['threshold']), f'{args.model} config.json (its eval on {found.get("dataset", "?")})'
    return threshold, source


def compare(args) -> Dict:
    threshold, source = _flag_threshold(args)
    paths = [_photo_file(p, '') for p in (args.a, args.b)]
    faces = _embedder(args)
    threshold, source = _recorded_threshold(args, faces, threshold, source)
    a, b = faces(paths, all_faces=False)
    out: Dict = dict(a=a.to_json(), b=b.to_json(), embedder=faces.info)
    missing = [r for r in (a, b) if r.face is None]
    if missing:
        r = missing[0]
        raise UserError(f'{r.source}: {r.error or "no face found"}')
    cosine = float(np.dot(a.face.embedding.astype(np.float64), b.face.embedding.astype(np.float64)))
    out.update(cosine=round(cosine, 6))
    if threshold is None:
        out.update(same=None, threshold=None,
                   note='no threshold: give --threshold (a cosine) or --results (an eval result of this model)')
        print('note: no threshold given (--threshold or --results): the cosine alone', file=sys.stderr)
    else:
        out.update(same=bool(cosine >= threshold), threshold=round(threshold, 6), threshold_from=source,
                   rule=SAME_RULE)
    return out


# ----------------------------------------------------------------------------------------------------------------
# embed (resumable) and search


def embed(args) -> Dict:
    from tqdm import tqdm

    from ..verification_data import list_images
    from .align import read_records, source_key
    from .gallery import save_gallery
    src, out = Path(args.photos), Path(args.out)
    if not src.is_dir():
        raise UserError(f'{src}: no such folder')
    if out.suffix != '.npz':
        raise UserError(f'--out {out}: a gallery is a .npz file')
    if out.exists() and not out.is_file():
        raise UserError(f'--out {out}: exists and is not a file')
    if out.exists() and not args.overwrite:
        raise UserError(f'--out {out}: exists (--overwrite to replace it)')
    if args.dtype not in ('float32', 'float16'):
        raise UserError(f'--dtype {args.dtype}: float32 or float16')
    try:
        names = list_images(src)
    except OSError as e:
        raise UserError(f'{src}: cannot be listed ({e.strerror or e})') from None
    if not names:
        raise UserError(f'{src}: no photos in it or its subfolders')
    work = out.with_name(out.name + '.partial')
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f'{work}: cannot create the folder ({e.strerror or e})') from None
    records_path, vectors_path = work / 'records.jsonl', work / 'embeddings.f32'
    done = read_records(records_path, key='photo')
    faces = _embedder(args)
    stated = dict(faces.info, select=args.select, score_threshold=args.score_threshold)
    info_path = work / 'embedder.json'
    try:
        before = json.loads(info_path.read_text()) if info_path.is_file() else None
    except (OSError, ValueError, RecursionError):
        before = 'unreadable'
    if before is not None and before != json.loads(json.dumps(stated)):
        raise UserError(f'{work} holds embeddings of another model or settings (or its embedder.json is damaged): '
                        f'remove it, or give those again')
    atomic_write(info_path, lambda f: f.write(json.dumps(stated).encode()))
    # the embeddings file holds one row per record with an embedding, appended in order: rows past the last record
    # (a crash between the two writes) are cut; a hand-edited record that does not fit is refused, nothing cut
    with_rows = [r for r in done.values() if 'row' in r]
    dims = {r.get('dim') for r in with_rows}
    if any(type(r['row']) is not int or r['row'] < 0 for r in with_rows) or \
            any(type(d) is not int or d < 1 for d in dims) or len(dims) > 1:
        raise UserError(f'{records_path}: records whose rows or sizes do not fit (edited?): remove {work} to start '
                        f'again')
    dim: Optional[int] = dims.pop() if dims else None
    next_row = max((r['row'] for r in with_rows), default=-1) + 1
    if with_rows:
        keep = next_row * dim * 4
        if not vectors_path.is_file() or vectors_path.stat().st_size < keep:
            raise UserError(f'{vectors_path}: shorter than its records (remove {work} to start again)')
        with open(vectors_path, 'r+b') as f:
            f.truncate(keep)
    # a photo is done when recorded from the same file: one replaced under its name (size, mtime) is embedded again
    todo = [n for n in names if n not in done or done[n].get('source') != source_key(src / n)]
    bar = tqdm(total=len(names), initial=len(names) - len(todo), desc='embed', unit='photo', file=sys.stderr,
               disable=not (args.progress and sys.stderr.isatty()))
    try:
        with open(records_path, 'a', encoding='utf-8') as log, open(vectors_path, 'ab') as vectors:
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start:start + args.batch_size]
                sources = [source_key(src / n) for n in batch]  # before reading: a later change is seen next time
                for name, source, result in zip(batch, sources, faces([src / n for n in batch], all_faces=False)):
                    record = dict(result.to_json(), photo=name, source=source)
                    if result.face is not None:
                        vector = result.face.embedding.astype(np.float32)
                        dim = dim or len(vector)
                        vectors.write(vector.tobytes())
                        vectors.flush()
                        record.update(row=next_row, dim=len(vector))
                        next_row += 1
                    log.write(json.dumps(record) + '\n')
                    log.flush()
                    done[name] = record
                    bar.update(1)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f'interrupted: {len(done)} of {len(names)} photos recorded in {work}; the same '
                                f'command resumes') from None
    finally:
        bar.close()
    listed = set(names)
    rows = sorted((r for r in done.values() if 'row' in r and r['photo'] in listed), key=lambda r: r['row'])
    matrix = np.fromfile(vectors_path, dtype=np.float32).reshape(-1, dim) if rows else np.zeros((0, 1), np.float32)
    embeddings = matrix[[r['row'] for r in rows]] if rows else np.zeros((0, dim or 1), np.float32)
    if not rows:
        raise UserError(f'{src}: no face found in any of its {len(names)} photos (records: {records_path})')
    save_gallery(out, embeddings, [r['photo'] for r in rows], dict(stated, source=str(src)), args.dtype)
    report = sorted((r for r in done.values() if r['photo'] in listed), key=lambda r: r['photo'])
    atomic_write(out.with_name(out.name + '.records.jsonl'),
                 lambda f: f.write(''.join(json.dumps(r) + '\n' for r in report).encode()))
    for p in (records_path, vectors_path, info_path):
        p.unlink()
    work.rmdir()
    statuses: Dict[str, int] = {}
    for r in report:
        statuses[r['status']] = statuses.get(r['status'], 0) + 1
    return dict(gallery=str(out), photos=len(names), embedded=len(rows), statuses=statuses, dim=dim,
                dtype=args.dtype, records=str(out.with_name(out.name + '.records.jsonl')), embedder=faces.info)


def search(args) -> Dict:
    from .gallery import open_gallery, search as top_k
    if args.k < 1:
        raise UserError(f'-k {args.k}: must be >= 1')
    if args.chunk < 1:
        raise UserError(f'--chunk {args.chunk}: must be >= 1')
    query = _photo_file(args.query, '--query')
    gallery = open_gallery(args.gallery)  # checked before the model loads: a bad file costs nothing
    faces = _embedder(args)
    result = faces([query], all_faces=False)[0]
    if result.face is None:
        raise UserError(f'--query {query}: {result.error or "no face found"}')
    vector = result.face.embedding
    if len(vector) != gallery.dim:
        open_gallery(args.gallery, dim=len(vector))  # the one-line message naming both sizes
    made_by = {k: gallery.meta.get(k) for k in ('model', 'checkpoint_sha256', 'artifact', 'sha256')
               if gallery.meta.get(k) is not None}
    mine = {k: faces.info.get(k) for k in made_by}
    if made_by != mine:
        print(f'warning: the gallery was embedded by {made_by}, the query by {mine}: cosines across models mean '
              f'nothing', file=sys.stderr)
    scores, rows = top_k(gallery, vector, k=args.k, chunk=args.chunk)
    return dict(query=result.to_json(), gallery=str(args.gallery), entries=len(gallery),
                matches=[dict(photo=gallery.path(int(i)), cosine=round(float(s), 6), row=int(i))
                         for s, i in zip(scores[0], rows[0])])


# ----------------------------------------------------------------------------------------------------------------
# demo


def _check_address(host: str, port: int) -> None:
    """UserError unless this machine can listen on host:port (a taken port, another machine's address)."""
    import socket
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no conflict
            s.bind(address)
    except OSError as e:
        raise UserError(f'--host {host} --port {port}: cannot serve there ({e.strerror or e})') from None


def demo(args) -> Dict:
    import contextlib
    import time
    threshold, source = _flag_threshold(args)
    if not 1 <= args.port <= 65535:
        raise UserError(f'--port {args.port}: a TCP port, 1 to 65535')
    try:
        from .demo import build_demo
    except ModuleNotFoundError as e:
        if (e.name or '').split('.')[0] != 'gradio':
            raise
        raise UserError("the demo needs gradio: pip install 'timm-mobileone[demo]'") from None
    _check_address(args.host, args.port)  # before the model loads
    faces = _embedder(args)
    threshold, source = _recorded_threshold(args, faces, threshold, source)
    page = build_demo(faces, threshold, threshold_from='' if source in (None, 'given') else source)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # gradio's own lines: stdout carries the one JSON object
            page.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True,
                        show_error=True)
    except OSError as e:  # the port taken, the host not this machine's
        raise UserError(f'--host {args.host} --port {args.port}: cannot serve there ({str(e).split(". ")[0]})') \
            from None
    url = f'http://{args.host}:{args.port}'
    print(f'demo: serving {url} (Ctrl-C stops it)', file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print('demo: stopped', file=sys.stderr)
    finally:
        with contextlib.redirect_stdout(sys.stderr):
            page.close()
    return dict(url=url, threshold=None if threshold is None else round(threshold, 6),
                threshold_from=source, embedder=faces.info)


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(prog='python -m timm_mobileone.faces', description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest='command', required=True)
    p = commands.add_parser('compare', help='two photos: cosine and same / different',
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('a')
    p.add_argument('b')
    p.add_argument('--threshold', type=float, default=None, help='cosine at and above which the answer is "same"')
    p.add_argument('--results', default='', help='an eval result of this model (--results-file): its threshold')
    _model_flags(p)
    p = commands.add_parser('embed', help='a folder of photos to a gallery file',
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('photos')
    p.add_argument('--out', required=True, help='the gallery file (.npz)')
    p.add_argument('--dtype', default='float32', help='float32 or float16 (half the size; cosines to ~1e-3)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --out')
    p.add_argument('--no-progress', dest='progress', action='store_false')
    _model_flags(p)
    p = commands.add_parser('search', help='the nearest gallery entries of a photo',
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--gallery', required=True)
    p.add_argument('--query', required=True)
    p.add_argument('-k', type=int, default=5)
    p.add_argument('--chunk', type=int, default=32768, help='gallery rows per matrix product')
    _model_flags(p)
    p = commands.add_parser('demo', help='a web page to try it: two photos, same person or not (the [demo] extra)',
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--threshold', type=float, default=None, help='cosine at and above which the answer is "same"')
    p.add_argument('--results', default='', help='an eval result of this model (--results-file): its threshold')
    p.add_argument('--host', default='127.0.0.1', help='address to serve on (0.0.0.0: every interface)')
    p.add_argument('--port', type=int, default=7860, help='TCP port to serve on')
    _model_flags(p)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise UserError('--batch-size must be >= 1')
    return args


@cli
def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    result = dict(compare=compare, embed=embed, search=search, demo=demo)[args.command](args)
    result = dict(command=args.command, **result)
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
