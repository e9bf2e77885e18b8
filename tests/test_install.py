"""A source checkout without the compiled extension says so (the README's first command used to
fail here with a bare "No module named 'decdec._C'")."""
import shutil
import subprocess
import sys
from pathlib import Path

import decdec

PKG = Path(decdec.__file__).parent


def _copy_package(dst: Path) -> Path:
    """decdec's Python files (no compiled _C) under dst/decdec."""
    shutil.copytree(PKG, dst / "decdec", ignore=shutil.ignore_patterns("_C*", "*.so", "*.pyd",
                                                                        "__pycache__"))
    assert not list((dst / "decdec").glob("_C*"))
    return dst


def _import_decdec(cwd: Path) -> subprocess.CompletedProcess:
    # -I: isolated mode, so neither PYTHONPATH nor the user's site can supply another decdec; the
    # script puts cwd first on the path, exactly as `python -m decdec` run from a checkout does.
    # An editable install (`pip install -e .`, the README's way) adds a meta-path finder that maps
    # `decdec` to the real checkout; drop it so the copy is what gets imported.
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
            "(getattr(f, '__module__', '') or type(f).__module__).lower()]; "
            "sys.path.insert(0, '.'); import decdec; print(decdec.__file__)")
    return subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_source_checkout_without_extension_names_the_fix(tmp_path):
    root = _copy_package(tmp_path)
    (root / "setup.py").write_text("# a checkout\n")
    (root / "csrc").mkdir()
    r = _import_decdec(root)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: decdec is imported from the source folder "), r.stderr
    assert str(root / "decdec") in last
    assert "pip install -e ." in last and "outside the checkout" in last
    assert "ModuleNotFoundError: No module named 'decdec._C'" in r.stderr  # the cause is chained


def test_incomplete_installation_is_not_called_a_checkout(tmp_path):
    root = _copy_package(tmp_path)  # no setup.py / csrc beside it: an installed copy missing _C
    r = _import_decdec(root)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: decdec's compiled extension decdec._C is missing"), r.stderr
    assert "source folder" not in last


def test_the_checkout_imports_once_built():
    # this test session imports decdec from wherever it was built: _C is there and loaded
    assert decdec._C.__name__ == "decdec._C" and hasattr(decdec, "DecLinear")
