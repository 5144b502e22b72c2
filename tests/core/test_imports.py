"""Import hygiene: the core never imports lightning; the package import stays light."""

import subprocess
import sys
from pathlib import Path

import lightning_gradguard.core

CORE = Path(lightning_gradguard.core.__file__).parent


def _imported_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; {code}; print('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


def test_core_imports_no_lightning():
    modules = sorted(
        ".".join(p.relative_to(CORE).with_suffix("").parts).removesuffix(".__init__") for p in CORE.rglob("*.py")
    )
    modules = [m for m in modules if m != "__init__"]
    code = "import lightning_gradguard.core; " + "; ".join(f"import lightning_gradguard.core.{m}" for m in modules)
    loaded = _imported_after(code)
    assert not {m for m in loaded if m.split(".")[0] in {"lightning", "pytorch_lightning", "lightning_fabric"}}
    assert len(modules) >= 20


def test_core_sources_do_not_mention_lightning_imports():
    for path in CORE.rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")):
                assert "lightning." not in stripped.replace("lightning_gradguard.", ""), (path, line)


def test_package_import_pulls_neither_matplotlib_nor_sklearn():
    loaded = _imported_after("import lightning_gradguard")
    assert not {m for m in loaded if m.split(".")[0] in {"matplotlib", "sklearn"}}


def test_public_names_resolve():
    import lightning_gradguard as gg

    for name in gg.__all__:
        assert getattr(gg, name) is not None
    assert issubclass(gg.DivergenceError, RuntimeError)
