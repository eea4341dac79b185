"""Size metrics of the package (issue 25): lines per file, per class, and every function whose body (signature
and docstring excluded) is longer than a limit.

  python scripts/code_metrics.py [--limit 60] [paths...]
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's body from its first statement after the docstring to its last line."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        if isinstance(body[0].value.value, str):
            body = body[1:]
    if not body:
        return 0
    return body[-1].end_lineno - body[0].lineno + 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("paths", nargs="*", default=["lightning_imaml"])
    p.add_argument("--limit", type=int, default=60)
    a = p.parse_args(argv)
    files = sorted(
        f for path in a.paths for f in (Path(path).rglob("*.py") if Path(path).is_dir() else [Path(path)])
    )
    longest, over = [], []
    for f in files:
        tree = ast.parse(f.read_text())
        n = len(f.read_text().splitlines())
        classes = [
            f"{c.name} {c.end_lineno - c.lineno + 1}" for c in ast.walk(tree) if isinstance(c, ast.ClassDef)
        ]
        print(f"{f}: {n} lines; classes: {', '.join(classes) or '-'}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                b = body_lines(node)
                longest.append((b, f"{f}:{node.lineno} {node.name}"))
                if b > a.limit:
                    over.append((b, f"{f}:{node.lineno} {node.name}"))
    print(
        "\nlongest function bodies:",
        *[f"  {b:4d}  {name}" for b, name in sorted(longest, reverse=True)[:8]],
        sep="\n",
    )
    print(f"\nfunctions with a body over {a.limit} lines: {len(over)}")
    for b, name in sorted(over, reverse=True):
        print(f"  {b:4d}  {name}")
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
