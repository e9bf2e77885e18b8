"""The README's quick start is what CI runs (issue 7, item 0): .ci/run reads the two commands from
README.md and runs them verbatim, and they are the editable-install commands that work from the root
of a fresh clone."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = ["python3 -m pip install -e . && python3 -m decdec demo",
            "python3 -m pip install -e . pytest && python3 -m pytest -q tests"]


def _readme_block() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_quickstart_commands():
    lines = _readme_block()
    assert len(lines) == 2
    # each line is the command, then whitespace and a '# comment'
    assert [re.split(r"\s+#", line, maxsplit=1)[0] for line in lines] == EXPECTED


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ci_runs_exactly_the_readme_commands():
    r = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print-quickstart"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == EXPECTED
    script = (ROOT / ".ci" / "run").read_text()
    # ... and runs what it printed, each command on its own, after the test-only installs
    assert 'mapfile -t CMDS < <(quickstart)' in script
    assert 'bash -euo pipefail -c "$cmd"' in script
    assert script.index("torch==2.13.0") < script.index('for cmd in "${CMDS[@]}"')


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("missing", ["bench/reliability.py", "bench/sanitize_cpu.sh"])
def test_ci_fails_loudly_on_a_missing_step(tmp_path, missing):
    """The fuzz and sanitizer steps are checked before anything runs: a missing script stops CI
    with its name, it is never skipped."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    (tmp_path / "bench").mkdir()
    for step in ("bench/reliability.py", "bench/sanitize_cpu.sh"):
        if step != missing:
            (tmp_path / step).write_text("")
    # PYTHON=false: should the check ever move after an install, this fails instead of installing
    r = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True,
                       timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHON": "false"})
    assert r.returncode == 1
    assert r.stderr.strip() == f".ci/run: {missing} is missing"
    script = (ROOT / ".ci" / "run").read_text()
    assert "\n$PY bench/reliability.py --quick\n" in script
    assert "\nbash bench/sanitize_cpu.sh\n" in script
