"""Build the API reference from the docstrings with pdoc: ``make docs`` (output in ``build/docs/api``).

Every public module of the package gets a page (Google-style docstrings). Any warning raised while pdoc imports and
renders the modules (an unresolvable cross-reference, a docstring pdoc cannot parse, a module that fails to import)
fails the build, so the reference never silently loses a page. Deprecation notices of third-party packages imported
along the way are not ours to fix and are ignored.
"""

from __future__ import annotations

import argparse
import pkgutil
import re
import sys
import warnings
from pathlib import Path

import pdoc
import pdoc.render

import lightning_gradguard

_THIRD_PARTY_NOISE = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def public_modules() -> list[str]:
    """``lightning_gradguard`` and every submodule whose dotted path has no ``_``-prefixed part."""
    names = ["lightning_gradguard"]
    for info in pkgutil.walk_packages(lightning_gradguard.__path__, "lightning_gradguard."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


# table syntax left raw in the rendered text (outside code): an RST "=====" table, which Markdown does not know, or
# a Markdown table that did not render (no blank line before it, a row with a missing cell)
_RAW_TABLE = re.compile(r"={5,}|^\s*\|.*\|\s*$", re.MULTILINE)
_CODE = re.compile(r'<div class="pdoc-code codehilite">.*?</div>|<pre.*?</pre>|<code.*?</code>', re.DOTALL)


def raw_tables(out: Path) -> list[str]:
    """``page: text`` for each piece of table syntax that the pages under ``out`` show as plain text."""
    found = []
    for page in sorted(out.rglob("*.html")):
        text = _CODE.sub("", page.read_text(encoding="utf-8"))
        found += [f"{page.relative_to(out)}: {m.group(0).strip()[:60]}" for m in _RAW_TABLE.finditer(text)]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/docs/api"), help="output directory")
    args = parser.parse_args(argv)
    pdoc.render.configure(docformat="google", footer_text=f"lightning-gradguard {lightning_gradguard.__version__}")
    modules = public_modules()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*modules, output_directory=args.out)
    problems = [
        w
        for w in caught
        if not (issubclass(w.category, _THIRD_PARTY_NOISE) and "lightning_gradguard" not in str(w.filename))
    ]
    for w in problems:
        print(f"docs warning: {w.category.__name__}: {w.message} ({w.filename}:{w.lineno})", file=sys.stderr)
    tables = raw_tables(args.out)
    for where in tables:
        print(f"docs warning: table syntax shown as text (write a Markdown table or a list): {where}", file=sys.stderr)
    if problems or tables:
        print(f"API reference NOT clean: {len(problems) + len(tables)} warning(s)", file=sys.stderr)
        return 1
    print(f"API reference: {len(modules)} modules -> {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
