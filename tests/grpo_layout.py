"""grpo.py's machinery in widematch/ (issue 29): the helpers import no stage script, and the stages that share
model loading and prompt encoding with the trainer no longer import the trainer."""
import ast
import glob
import json
import os
import subprocess
import sys

import grpo

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = tuple(f"widematch.{os.path.basename(p)[:-3]}"  # every module of the package
                for p in sorted(glob.glob(os.path.join(HERE, "widematch", "*.py"))) if not p.endswith("__init__.py"))


def imported_scripts(*modules):
    """The repo's top-level scripts that importing `modules` in a fresh interpreter loads."""
    scripts = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "*.py")))
    code = (f"import importlib, json, sys\nfor m in {list(modules)!r}: importlib.import_module(m)\n"
            f"print(json.dumps([s for s in {scripts!r} if s in sys.modules]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.splitlines()[-1])


def statement_imports(path):
    """Every module name an import statement of the file names, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_grpo_helpers_import_no_stage_script_and_stages_not_the_trainer():
    assert len(HELPERS) >= 15 and "widematch.rollout" in HELPERS
    assert imported_scripts(*HELPERS) == []
    scripts = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "*.py"))}
    for m in HELPERS:  # not even inside a function (a lazy import is an import cycle waiting to happen)
        path = os.path.join(HERE, *m.split(".")) + ".py"
        assert not statement_imports(path) & scripts, (m, statement_imports(path) & scripts)
    assert "grpo" not in imported_scripts("tiny_model", "evaluate", "human")  # they share widematch/, not the trainer
    # grpo.py imports the machinery it uses by name (tests replace it there) and re-exports nothing else
    from widematch import checkpoint, model_io
    assert grpo.encode is model_io.encode and not hasattr(grpo, "load_policy") and not hasattr(grpo, "generate")
    assert grpo.latest_checkpoint is checkpoint.latest_checkpoint and grpo.collate_samples is model_io.collate_samples


def repo_imports(path, scripts):
    """The repo modules a file imports anywhere in it: top-level scripts by name, package modules as widematch.x."""
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "widematch":
            out |= {f"widematch.{a.name}" for a in node.names}  # from widematch import dist
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)  # from widematch.dist import x, from reward import y
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m in scripts or m.startswith("widematch.")}


def test_no_import_cycle_among_stage_scripts_and_the_package():
    files = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(HERE, "*.py"))}
    files.update({m: os.path.join(HERE, *m.split(".")) + ".py" for m in HELPERS})
    graph = {m: repo_imports(p, files) & set(files) for m, p in files.items()}
    assert "reward" in graph["grpo"] and "widematch.rollout" in graph["grpo"]  # the graph sees both kinds
    done, cycles = set(), []

    def visit(m, path):  # depth-first; a module met again on the current path closes a cycle
        if m in path:
            cycles.append(path[path.index(m):] + [m])
            return
        if m in done:
            return
        for d in sorted(graph[m]):
            visit(d, path + [m])
        done.add(m)
    for m in sorted(graph):
        visit(m, [])
    assert cycles == [], cycles
