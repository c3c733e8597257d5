#!/usr/bin/env python3
"""More calibration text for `tcc build --calibration`: a file of sentences one a line, then
English sentences from the documentation of Python's standard library (its modules',
classes' and functions' docstrings), the same on any machine with the same Python.

    benches/calibration_text.py calib.txt --sentences 2800 > calib_big.txt

Pruning and sparsity fit each product on the tokens the calibration text gives; the more
tokens, the better the fit (MiniLM-L6 at 50% sparsity: 108 queries, 3,620 tokens, held-out
cosine 0.940; with 2,800 docstring sentences, 16,384 tokens used, 0.950). The sentences are
not in any held-out set tcc's tests use.
"""

import argparse
import importlib
import inspect
import pkgutil
import random
import re
import sys
import warnings

# Modules whose import has side effects (a window, a browser, the interpreter's exit).
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtledemo", "test", "lib2to3", "ensurepip", "venv"}


def sentences():
    seen = set()
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names)
    for name in names:
        if name in SKIP or name.startswith("_"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:
            continue
        objs = [mod] + [o for _, o in sorted(vars(mod).items()) if inspect.isclass(o) or inspect.isfunction(o)]
        for o in objs:
            doc = inspect.getdoc(o) or ""
            for para in doc.split("\n\n"):
                text = " ".join(para.split())
                for s in re.split(r"(?<=[.!?])\s+", text):
                    # Prose only: a capital first, a full stop last, no code.
                    if (
                        20 <= len(s) <= 300
                        and s[0].isupper()
                        and s.endswith(".")
                        and not re.search(r"[>{}=\[\]]|::|\w\(", s)
                        and s not in seen
                    ):
                        seen.add(s)
                        yield s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("first", help="sentences one a line, written first (the calibration set itself)")
    ap.add_argument("--sentences", type=int, default=2800, help="docstring sentences after them")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with open(args.first, encoding="utf-8") as f:
        first = [line.rstrip("\n") for line in f if line.strip()]
    more = list(sentences())
    random.Random(args.seed).shuffle(more)
    if len(more) < args.sentences:
        sys.exit(f"only {len(more)} docstring sentences found, {args.sentences} asked")
    for line in first + more[: args.sentences]:
        print(line)


if __name__ == "__main__":
    main()
