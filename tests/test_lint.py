import subprocess
import sys

from tests.conftest import ROOT


def test_ruff_clean():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_function_over_60_lines_and_no_class_over_200():
    """Short enough to read at once (issue 25): every function and class of the package."""
    import ast

    too_long = []
    for path in sorted((ROOT / "muppet_ray").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            limit = (60 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                     else 200 if isinstance(node, ast.ClassDef) else None)
            if limit and node.end_lineno - node.lineno + 1 > limit:
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
                                f"({node.end_lineno - node.lineno + 1} lines, limit {limit})")
    assert not too_long, "\n".join(too_long)
