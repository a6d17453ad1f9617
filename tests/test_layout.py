"""The package's layout: model code apart from tooling, `errors` a leaf, and no import circle anywhere.

The imports are read from the source (every `import` statement, those inside functions included: a lazy import that
closes a circle still ties the modules together), not from `sys.modules`.
"""
import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parents[1] / 'timm_mobileone'


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
    assert graph['timm_mobileone.errors'] == set()
    models = {m for m in graph if m.startswith('timm_mobileone.models')}
    allowed = models | {'timm_mobileone.mxnet', 'timm_mobileone.errors'}  # the MobileFaceNet port reads MXNet graphs
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
