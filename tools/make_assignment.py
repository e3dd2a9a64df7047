"""make_assignment.py: write a student copy of this repository with the exercises blanked.

The reference code carries solution markers, comments that change nothing when it runs:

    # BEGIN SOLUTION fsq: bound with tanh, round with a straight-through gradient
    ...the reference lines...
    # END SOLUTION

In the copy every selected block becomes one line at the BEGIN line's indentation,

    raise NotImplementedError("fsq: bound with tanh, round with a straight-through gradient")

and every other block keeps its code and loses its two marker lines. One name may mark several
blocks (a copied primitive is marked in every file it is copied to, so blanking it blanks all of
its copies). docs/EXERCISES.md lists the exercises; tools/grade.py grades a copy.

    python tools/make_assignment.py --out /tmp/hw                 # every exercise blanked
    python tools/make_assignment.py --out /tmp/hw1 --only fsq     # one exercise
    python tools/make_assignment.py --list                        # the exercise names

Copied: the tracked files (and new untracked ones that git does not ignore), or, outside a git
checkout, every file except .git, out/ and __pycache__. Markers are read from comment tokens only,
so a marker-like line inside a string is text, not a marker. The tool refuses unpaired or nested
markers, a block without a name, and unknown --only names, and checks that every .py file it
writes still parses.
"""
import argparse
import ast
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAMP = ".assignment.json"  # written into the copy: which exercises it blanks (tools/grade.py reads it)
BEGIN = re.compile(r"#\s*BEGIN SOLUTION\b\s*(?P<name>[A-Za-z0-9_]*)\s*(?::\s*(?P<hint>.*?))?\s*$")
END = re.compile(r"#\s*END SOLUTION\b")
SKIP_DIRS = {".git", "out", "__pycache__"}


class MarkerError(ValueError):
    pass


def find_blocks(source, path="<source>"):
    """-> [(name, hint, begin_line, end_line, indent)] of the solution blocks in `source`
    (1-based line numbers of the two marker lines). Raises MarkerError naming the file and line."""
    blocks = []
    open_block = None  # (name, hint, line, indent) of the BEGIN not yet closed
    lines = source.splitlines()
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    for tok in tokens:
        if tok.type != tokenize.COMMENT:
            continue
        row, col = tok.start
        begin, end = BEGIN.match(tok.string), END.match(tok.string)
        if not (begin or end):
            continue
        where = f"{path}:{row}"
        if lines[row - 1][:col].strip():
            raise MarkerError(f"{where}: a solution marker must be on a line of its own")
        if begin:
            if open_block is not None:
                raise MarkerError(f"{where}: nested BEGIN SOLUTION (the block opened at line {open_block[2]} "
                                  f"is not closed)")
            if not begin["name"]:
                raise MarkerError(f"{where}: BEGIN SOLUTION needs a name: # BEGIN SOLUTION <name>: <hint>")
            open_block = (begin["name"], begin["hint"] or "implement this block", row, col)
        else:
            if open_block is None:
                raise MarkerError(f"{where}: END SOLUTION without a BEGIN SOLUTION")
            name, hint, start, indent = open_block
            if col != indent:
                raise MarkerError(f"{where}: END SOLUTION is indented {col}, its BEGIN (line {start}) {indent}")
            blocks.append((name, hint, start, row, indent))
            open_block = None
    if open_block is not None:
        raise MarkerError(f"{path}:{open_block[2]}: BEGIN SOLUTION {open_block[0]} is never closed")
    return blocks


def strip_blocks(source, blocks, selected):
    """The source with each block in `selected` replaced by a raise, every marker line removed."""
    lines = source.splitlines(keepends=True)
    out = []
    previous_end = 0  # lines before this index are done
    for name, hint, start, end, indent in blocks:
        out += lines[previous_end:start - 1]
        if name in selected:
            message = json.dumps(f"{name}: {hint}", ensure_ascii=False)  # a valid Python string literal
            out.append(" " * indent + f"raise NotImplementedError({message})\n")
        else:
            out += lines[start:end - 1]  # the reference code, without its two marker lines
        previous_end = end
    return "".join(out + lines[previous_end:])


def source_files(root):
    """Paths (relative to root) of the files a student copy holds."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=root, capture_output=True, check=True).stdout.decode().split("\0")
        files = [f for f in listed if f and (root / f).is_file()]  # a deleted tracked file is not copied
    except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout: walk the tree
        files = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
            files += [os.path.relpath(os.path.join(folder, n), root) for n in sorted(names)]
    return sorted(f for f in files if Path(f).name != STAMP and "__pycache__" not in Path(f).parts)


def exercises(root=ROOT):
    """{name: [(file, begin_line, hint), ...]} of every solution block under root."""
    found = {}
    for f in source_files(root):
        if f.endswith(".py"):
            for name, hint, start, _, _ in find_blocks((root / f).read_text(encoding="utf-8"), f):
                found.setdefault(name, []).append((f, start, hint))
    return found


def make_assignment(out, only=None, root=ROOT):
    """Write the student copy to `out` (must not exist or be empty); -> the blanked exercise names."""
    out, root = Path(out).resolve(), Path(root).resolve()
    known = exercises(root)
    selected = set(known) if only is None else set(only)
    unknown = sorted(selected - set(known))
    if unknown:
        raise MarkerError(f"unknown exercise(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if out == root or root in out.parents:
        raise MarkerError(f"--out {out} is inside the repository {root}; choose a folder outside it")
    if out.exists() and any(out.iterdir()):
        raise MarkerError(f"--out {out} exists and is not empty; choose a new folder")
    for f in source_files(root):
        target = out / f
        target.parent.mkdir(parents=True, exist_ok=True)
        if not f.endswith(".py"):
            shutil.copy2(root / f, target)
            continue
        source = (root / f).read_text(encoding="utf-8")
        text = strip_blocks(source, find_blocks(source, f), selected)
        try:
            ast.parse(text, filename=f)
        except SyntaxError as e:
            raise MarkerError(f"{f}:{e.lineno}: the blanked file does not parse ({e.msg}); "
                              f"a block must hold whole statements") from None
        target.write_text(text, encoding="utf-8")
        shutil.copymode(root / f, target)
    (out / STAMP).write_text(json.dumps({"blanked": sorted(selected)}, indent=1) + "\n")
    return sorted(selected)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="make_assignment.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="folder for the student copy (new or empty)")
    ap.add_argument("--only", help="comma-separated exercise names to blank (default: all)")
    ap.add_argument("--list", action="store_true", help="print the exercises and where they are, then exit")
    a = ap.parse_args(argv)
    try:
        if a.list:
            for name, places in sorted(exercises().items()):
                print(f"{name:<16} " + ", ".join(f"{f}:{line}" for f, line, _ in places))
            return 0
        if not a.out:
            raise SystemExit("error: --out DIR is required (or --list)")
        only = None if a.only is None else [n.strip() for n in a.only.split(",") if n.strip()]
        if only is not None and not only:
            raise SystemExit("error: --only needs at least one exercise name (see --list)")
        blanked = make_assignment(a.out, only)
    except MarkerError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {a.out}: {len(blanked)} exercise(s) blanked: {', '.join(blanked)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
