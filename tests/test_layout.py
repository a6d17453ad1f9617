"""The package's layout: model code apart from tooling, `errors` and `hub_files` leaves, no import circle anywhere,
the wheel apart from the repository's tooling, one home for the Hub file names and the loading advice; and the front
door: a short README that links the changelog and the architecture page (docs/architecture.md draws these rules).

The imports are read from the source (every `import` statement, those inside functions included: a lazy import that
closes a circle still ties the modules together), not from `sys.modules`.
"""
import ast
import re
from pathlib import Path
from typing import Dict, List, Set

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'timm_mobileone'
LEAVES = ('timm_mobileone.errors', 'timm_mobileone.hub_files')  # import nothing of the project
REPO_ONLY = ('train', 'eval', 'benchmarks', 'tests')  # the repository's tooling, not in the wheel
README_LIMIT = 15_000  # bytes: the front door; release notes and the module layout live in their own pages


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix('').parts)
    if parts[-1] == '__init__':
        parts.pop()
    return '.'.join(parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split('.'))
    return path.with_suffix('.py').is_file() or (path / '__init__.py').is_file()


def import_graph() -> Dict[str, Set[str]]:
    """module -> the project modules it imports (`from .a import b` counts `a`, and `a.b` where b is a module)."""
    graph: Dict[str, Set[str]] = {}
    for path in sorted(PACKAGE.rglob('*.py')):
        name = _module_name(path)
        package = name if path.name == '__init__.py' else name.rpartition('.')[0]
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split('.')[:len(package.split('.')) - node.level + 1]
                    base = '.'.join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ''
                targets = [base] + [f'{base}.{a.name}' for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t.split('.')[0] == PACKAGE.name and _is_module(t) and t != name)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import circle as [a, b, ..., a], or [] where there is none (depth-first search, three colours)."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_find_cycle_sees_a_circle_through_a_lazy_import():
    # the checker itself: a circle closed by any edge is reported, a tree is not
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}) == []


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert 'timm_mobileone.checkpoints' in graph and graph['timm_mobileone.checkpoints']  # the walk sees imports
    assert find_cycle(graph) == [], ' -> '.join(find_cycle(graph))


def test_errors_is_a_leaf_and_models_stand_apart_from_tooling():
    graph = import_graph()
    for leaf in LEAVES:
        assert graph[leaf] == set(), f'{leaf} imports {sorted(graph[leaf])}'
    models = {m for m in graph if m.startswith('timm_mobileone.models')}
    # the MobileFaceNet port reads MXNet graphs; the loaders name the Hub files and give the advice of hub_files
    allowed = models | {'timm_mobileone.mxnet', *LEAVES}
    for module in models:
        assert graph[module] <= allowed, f'{module} imports tooling: {sorted(graph[module] - allowed)}'
    # the package root holds no model code: every nn.Module subclass lives in timm_mobileone.models
    for path in PACKAGE.rglob('*.py'):
        if _module_name(path).startswith('timm_mobileone.models'):
            continue
        classes = [n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)
                   and any('Module' in ast.unparse(b) for b in n.bases)]
        assert not classes, f'{path.name} defines modules {classes} outside timm_mobileone.models'


def test_every_subpackage_is_a_regular_package():
    # setuptools' find (pyproject.toml) ships folders with an __init__.py only: a namespace folder would be left
    # out of the wheel
    for folder in {p.parent for p in PACKAGE.rglob('*.py')}:
        assert (folder / '__init__.py').is_file(), f'{folder} has no __init__.py'


def _python_files():
    for folder in (PACKAGE, *(REPO / d for d in REPO_ONLY)):
        yield from sorted(p for p in folder.rglob('*.py') if '__pycache__' not in p.parts)


def test_the_wheel_imports_none_of_the_repository_tooling():
    # the installed wheel has no train/, eval/, benchmarks/ or tests/: an import of them works in a checkout only
    for path in PACKAGE.rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ''] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad = [n for n in names if n.split('.')[0] in REPO_ONLY]
            assert not bad, f'{path.relative_to(REPO)}:{node.lineno} imports {bad}: repository-only tooling'


def _assigned_names(path: Path) -> Set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def test_hub_file_names_are_assigned_in_one_module():
    # the loaders (inference_mode=True reads model_fused.safetensors) and `hub export` (writes it) must agree on the
    # names: each of hub_files' constants is assigned there and nowhere else in the package or the repository's tools
    home = PACKAGE / 'hub_files.py'
    constants = {n for n in _assigned_names(home) if n.isupper()}
    assert {'FUSED_WEIGHTS_NAME', 'WEIGHTS_NAME', 'EXPORT_FILES'} <= constants
    for path in _python_files():
        if path != home:
            again = constants & _assigned_names(path)
            assert not again, f'{path.relative_to(REPO)} assigns {sorted(again)} again (timm_mobileone/hub_files.py)'


def test_model_code_gives_no_command_advice():
    # what to run when no weights exist names repository commands (`python -m train.face`): that text lives in
    # timm_mobileone/hub_files.py, not in the model files
    for path in (PACKAGE / 'models').rglob('*.py'):
        text = path.read_text()
        assert 'python -m train.face' not in text, f'{path.name} names the trainer'
        commands = [n.value for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Constant)
                    and isinstance(n.value, str) and 'python -m ' in n.value]
        assert not commands, f'{path.name} holds command advice: {commands[0][:80]!r}'


def test_readme_is_the_front_door():
    readme = REPO / 'README.md'
    size = readme.stat().st_size
    assert size < README_LIMIT, f'README.md is {size:,} bytes (limit {README_LIMIT:,}): move detail to docs/'
    links = set(re.findall(r'\]\(([^)#\s]+)(?:#[^)\s]*)?\)', readme.read_text()))
    for page in ('CHANGELOG.md', 'docs/architecture.md'):
        assert (REPO / page).is_file(), f'{page} is missing'
        assert page in links, f'README.md does not link {page}'
    # the command CI runs (.ci/run: the README's test command) stays the one the README shows
    assert 'python -m pytest -q' in readme.read_text()


def _anchors(page: Path) -> Set[str]:
    """GitHub's heading anchors of a Markdown page (lowercase, punctuation dropped, spaces to hyphens)."""
    text = re.sub(r'```.*?```', '', page.read_text(), flags=re.S)
    return {re.sub(r'[^\w\- ]', '', h.strip().lower()).replace(' ', '-')
            for h in re.findall(r'^#+\s+(.*)$', text, re.M)}


def test_relative_links_of_the_readme_and_docs_resolve():
    pages = [REPO / 'README.md', REPO / 'CHANGELOG.md', *sorted((REPO / 'docs').glob('*.md'))]
    pages = [p for p in pages if p.is_file()]
    broken = []
    for page in pages:
        text = re.sub(r'```.*?```', '', page.read_text(), flags=re.S)
        for target in re.findall(r'\]\(([^)\s]+)\)', text):
            if re.match(r'[a-z][a-z0-9+.-]*:', target):  # https:, mailto:, ...
                continue
            path, _, anchor = target.partition('#')
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f'{page.relative_to(REPO)}: {target} (no such file)')
            elif anchor and dest.suffix == '.md' and anchor not in _anchors(dest):
                broken.append(f'{page.relative_to(REPO)}: {target} (no such heading)')
    assert not broken, '\n'.join(broken)


# ----------------------------------------------------------------------------------------------------------------
# eval as a library (issue 47): `eval.api` is eval's one public module. Outside eval/, nothing imports eval's private
# modules (`eval._x`) or reaches an eval CLI's parser to get a Namespace; training calls the API only.

EVAL = REPO / 'eval'
# test modules that unit-test a private module of eval directly (what they test is not part of the API)
PRIVATE_EVAL_TESTS = {
    'tests/test_ijb.py': "eval._ijb: insightface's IJB protocol against a transcription of its loops",
    'tests/test_eval_metrics.py': 'eval._verification: the 10-fold metric, function by function',
    'tests/test_fuzz.py': "eval._ijb's readers of single meta files (read_pairs, read_template_media)",
}
# what builds or reads an eval CLI's flags: calling one outside eval/ means handing eval an argv to get a Namespace
EVAL_PARSER_NAMES = {'parse_args', 'build_parser', 'parse', 'add_model_flags', 'add_align_flags', 'align_settings',
                     'command_line'}


def _outside_eval_files():
    skip = {'.venv', 'build', 'dist', '.git', '__pycache__', 'eval'}
    for path in sorted(REPO.rglob('*.py')):
        rel = path.relative_to(REPO)
        if not skip & set(rel.parts[:-1]) and not rel.parts[0].startswith('.'):
            yield path, rel.as_posix()


def _eval_bindings(tree: ast.AST) -> Dict[str, str]:
    """local name -> what of eval it is bound to ('eval.lfw' for a module, 'eval.lfw:main' for a name in one)."""
    bound: Dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split('.')[0] == 'eval':
                    bound[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or '').split('.')[0] == 'eval':
            for a in node.names:
                target = f'{node.module}.{a.name}' if node.module == 'eval' else f'{node.module}:{a.name}'
                bound[a.asname or a.name] = target
    return bound


def _private_eval_imports(tree: ast.AST) -> List[str]:
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [a.name for a in node.names if re.match(r'eval\._', a.name)]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            module = node.module or ''
            if re.match(r'eval\._', module):
                bad.append(module)
            elif module == 'eval':
                bad += [f'eval.{a.name}' for a in node.names if a.name.startswith('_')]
        elif isinstance(node, ast.Call) and getattr(node.func, 'attr', getattr(node.func, 'id', '')) == \
                'import_module' and node.args and isinstance(node.args[0], ast.Constant) \
                and re.match(r'eval\._', str(node.args[0].value)):
            bad.append(node.args[0].value)
    return bad


def test_private_eval_modules_are_imported_inside_eval_only():
    seen = 0
    for path, rel in _outside_eval_files():
        if rel in PRIVATE_EVAL_TESTS:
            continue
        tree = ast.parse(path.read_text(), str(path))
        seen += bool(_eval_bindings(tree))
        bad = _private_eval_imports(tree)
        assert not bad, f'{rel} imports {sorted(set(bad))}: outside eval/, use eval.api (its one public module)'
    assert seen > 10  # the walk sees the eval users (train, benchmarks, tests)
    for rel in PRIVATE_EVAL_TESTS:  # the exceptions are live, not stale
        assert _private_eval_imports(ast.parse((REPO / rel).read_text())), f'{rel} no longer needs its exception'


def _calls(tree: ast.AST):
    """(bound name, attribute or None) of every call `name(...)` / `name.attr(...)`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name):
                yield f.id, None
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                yield f.value.id, f.attr


def _eval_parser_calls(tree: ast.AST) -> List[str]:
    bound = _eval_bindings(tree)
    bad = []
    for name, attr in _calls(tree):
        target = bound.get(name)
        if target is None:
            continue
        called = target.rpartition(':')[2] if attr is None else attr
        if (attr is None and ':' in target or attr is not None and ':' not in target) and called in EVAL_PARSER_NAMES:
            bad.append(f'{target}{"." + attr if attr else ""}')
    return bad


def test_nothing_outside_eval_reaches_an_eval_parser():
    # flags -> spec -> API call: eval's CLIs parse their own argv; a caller builds an eval.api spec (ModelSpec,
    # ArtifactSpec, EmbedOptions, Alignment), never an argv for eval's parser. Tests exercise the CLIs, parsers
    # included (test_hub checks the `rerun` each parser writes), so tests/ is exempt.
    assert _eval_parser_calls(ast.parse('from eval import lfw\nfrom eval.align import align_settings\n'
                                        'lfw.parse_args([])\nalign_settings(a)\nlfw.main([])')) == \
        ['eval.lfw.parse_args', 'eval.align:align_settings']  # the checker itself
    for path, rel in _outside_eval_files():
        if rel.startswith('tests/'):
            continue
        bad = _eval_parser_calls(ast.parse(path.read_text(), str(path)))
        assert not bad, f'{rel} calls {bad}: build an eval.api spec instead of an argv for an eval parser'


def test_training_calls_eval_through_its_api_only():
    # train/ imports eval.api and nothing else of eval: no CLI module, no main(argv)
    for path in sorted((REPO / 'train').rglob('*.py')):
        bound = _eval_bindings(ast.parse(path.read_text(), str(path)))
        other = sorted({t for t in bound.values() if t.partition(':')[0] != 'eval.api'})
        assert not other, f'train/{path.name} uses {other}: call eval.api'


def test_eval_has_one_light_public_module():
    import eval.api as api
    assert api.__all__ and all(hasattr(api, n) for n in api.__all__)
    # eval/__init__.py imports nothing: `import eval.x` stays cheap, and no name there shadows a CLI module
    init = ast.parse((EVAL / '__init__.py').read_text())
    assert not [n for n in ast.walk(init) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_every_test_file_has_its_seconds_for_the_schedule():
    # conftest.FILE_SECONDS orders the files for pytest-xdist, longest first: a new file gets its figure (one
    # `python -m pytest -q --durations=0`), a renamed or removed one loses it
    from conftest import FILE_SECONDS
    files = {p.name for p in (REPO / 'tests').glob('test_*.py')}
    assert not files - set(FILE_SECONDS), f'add to tests/conftest.py FILE_SECONDS: {sorted(files - set(FILE_SECONDS))}'
    assert not set(FILE_SECONDS) - files, f'no such test file: {sorted(set(FILE_SECONDS) - files)}'
