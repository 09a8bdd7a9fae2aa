"""The framework (dbench/) knows no method and no task kind by name.

Read from the source, as the import-cycle test does: no module of dbench/ outside dbench/tasks/ spells a
registered task kind, none branches on a method name (compares with it, keys a table by it), none imports a
method's module, and only the data sets (which declare their task) and the tasks themselves import a task's
module. A method's name as a default value (``RunConfig.method = "bp"``) is a default, not knowledge of it.
"""
from __future__ import annotations

import ast
from pathlib import Path

from dbench.registry import METHODS, TASKS

ROOT = Path(__file__).resolve().parents[1] / "dbench"
DECLARE_TASKS = {"data", "tasks"}  # dbench/data/ (a data set names its task) and dbench/tasks/ itself


def problems(source: str, where: str, methods: set[str], kinds: set[str], may_import_tasks: bool,
             in_tasks: bool) -> list[str]:
    found = []
    tree = ast.parse(source)

    def name(node) -> str | None:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    for node in ast.walk(tree):
        if not in_tasks and name(node) in kinds:
            found.append(f"{where}:{node.lineno} spells the task kind {name(node)!r}")
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                if name(side) in methods:
                    found.append(f"{where}:{node.lineno} compares with the method name {name(side)!r}")
        if isinstance(node, ast.Dict):
            found += [f"{where}:{node.lineno} keys a table by the method name {name(k)!r}"
                      for k in node.keys if name(k) in methods]
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for module in modules:
                if module == "methods" or module.startswith("methods."):
                    found.append(f"{where}:{node.lineno} imports the method module {module}")
                if module.startswith("dbench.tasks") and not may_import_tasks:
                    found.append(f"{where}:{node.lineno} imports the task module {module}")
    return found


def test_no_module_of_the_framework_names_a_method_or_a_task():
    methods, kinds = set(METHODS.names()), set(TASKS.names())
    assert {"bp", "fr", "ddp"} <= methods and {"classification", "language model"} <= kinds
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        part = path.relative_to(ROOT).parts[0]
        found += problems(path.read_text(), str(path.relative_to(ROOT.parent)), methods, kinds,
                          may_import_tasks=part in DECLARE_TASKS, in_tasks=part == "tasks")
    assert found == []


def test_the_checker_finds_each_kind_of_naming():
    source = '''
import methods.fr
from dbench.tasks.classification import KIND
if run.method == "fr":
    pass
COSTS = {"bp": 1.0}
if task == "language model":
    pass
def f(method="bp"):  # a default: allowed
    return method
'''
    found = problems(source, "x.py", {"bp", "fr"}, {"language model"}, may_import_tasks=False, in_tasks=False)
    assert [f.split(" ", 1)[1] for f in found] == [
        "imports the method module methods.fr", "imports the task module dbench.tasks.classification",
        "compares with the method name 'fr'", "keys a table by the method name 'bp'",
        "spells the task kind 'language model'"]
