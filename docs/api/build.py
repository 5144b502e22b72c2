"""Build the API reference from the docstrings with pdoc: ``make docs`` (output in ``build/docs/api``).

Every public module of the package gets a page (Google-style docstrings). Any warning raised while pdoc imports and
renders the modules (an unresolvable cross-reference, a docstring pdoc cannot parse, a module that fails to import)
fails the build, so the reference never silently loses a page. Deprecation notices of third-party packages imported
along the way are not ours to fix and are ignored.
"""

from __future__ import annotations

import argparse
import pkgutil
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
    if problems:
        print(f"API reference NOT clean: {len(problems)} warning(s)", file=sys.stderr)
        return 1
    print(f"API reference: {len(modules)} modules -> {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
