"""The tutorials under docs/tutorials run as written: their code blocks, in order, as one script.

A user copies a page's ``python`` blocks into one file and runs it; so does this test, in a
fresh interpreter (worker processes are spawned and import that file again, as they would for
the user). The pages' own asserts check what the text claims (one digest on every executor,
the hand-built DS-FL equal to the shipped one, ...).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _paths import mnist_dir
from _ray_helpers import ENV as RAY_ENV
from _ray_helpers import describe, ray_pids, strays, wait_until_gone

TUTORIALS = Path(__file__).resolve().parents[1] / "docs" / "tutorials"
# The pages the documentation promises; a new page is picked up by the glob below.
EXPECTED = {"quickstart", "dsfl", "reproducibility", "property-testing", "sweeps"}
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_OUTPUT = re.compile(r"^```text\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_DIGEST = re.compile(r"\b[0-9a-f]{16}\b")
PORTABLE = "fl.portable.enable()"
# A page that downloads MNIST into ./mnist finds the files already there (verified, so nothing
# is fetched): the suite runs offline.
MNIST = 'download_mnist("mnist"'
PAGES = sorted(TUTORIALS.glob("*.md"))


def script_name(page: Path) -> str:
    """The file a user would save the page's code as (a module name: no hyphens)."""
    return page.stem.replace("-", "_") + ".py"


def code_of(page: Path) -> str:
    """The page's ``python`` code blocks joined in order (other blocks are output or shell)."""
    return "\n".join(_BLOCK.findall(page.read_text()))


def test_the_promised_tutorials_exist_and_have_code() -> None:
    pages = {p.stem: p for p in PAGES}
    assert set(pages) >= EXPECTED, sorted(pages)
    for page in pages.values():
        assert code_of(page).count("\n") >= 10, f"{page.name} has (almost) no code"


def test_every_python_looking_block_is_extracted() -> None:
    # A block the regex misses (indented under a list, ```py, ```python title=...) would render
    # but never run: refuse such pages rather than let their code rot.
    for page in PAGES:
        text = page.read_text()
        fences = re.findall(r"^\s*```\s*py", text, re.MULTILINE)
        assert len(fences) == len(_BLOCK.findall(text)), f"{page.name}: a python block is skipped"


def test_the_block_extractor_keeps_only_python_blocks(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("x\n```python\na = 1\n```\n```text\nout\n```\n```python\nb = a\n```\n")
    assert code_of(page) == "a = 1\n\nb = a\n"


@pytest.mark.slow
@pytest.mark.xdist_group("ray")  # the quickstart starts Ray; Ray processes are counted
@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_tutorial_runs(page: Path, tmp_path: Path) -> None:
    name = page.stem
    script = tmp_path / script_name(page)
    script.write_text(code_of(page))
    if MNIST in code_of(page):
        source = mnist_dir()
        if source is None:
            pytest.skip("MNIST not found (set BLAZEFL_FN_MNIST_DIR)")
        (tmp_path / "mnist").mkdir()
        for file in source.iterdir():  # copies that the page may write beside (not read-only)
            shutil.copyfile(file, tmp_path / "mnist" / file.name)
    env = {**os.environ, **RAY_ENV}
    before = ray_pids()
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{name}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    left = wait_until_gone(strays(before))
    assert not left, f"the tutorial left Ray processes behind: {describe(left)}"
    if PORTABLE in page.read_text():
        # A page that runs portable shows the digests any x86-64 machine prints: every one of
        # them must be what this run printed.
        shown = set(_DIGEST.findall("\n".join(_OUTPUT.findall(page.read_text()))))
        assert shown, f"{name} runs portable but shows no digest"
        assert shown <= set(_DIGEST.findall(done.stdout)), (shown, done.stdout)


PYRIGHT = Path(sys.executable).parent / "pyright"


@pytest.mark.slow
@pytest.mark.skipif(not PYRIGHT.exists(), reason="pyright is installed by the dev extra")
def test_tutorial_code_type_checks_as_user_code(tmp_path: Path) -> None:
    """The pages teach the typed surface: their code passes pyright strict from outside the repo."""
    for page in PAGES:
        (tmp_path / script_name(page)).write_text(code_of(page))
    (tmp_path / "pyrightconfig.json").write_text(json.dumps({"typeCheckingMode": "strict"}))
    done = subprocess.run(
        [str(PYRIGHT), "--outputjson", "--pythonpath", sys.executable, "."],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    report = json.loads(done.stdout)
    assert report["summary"]["filesAnalyzed"] == len(PAGES)
    errors = [
        f"{Path(d['file']).name}:{d['range']['start']['line'] + 1}: {d['message']}"
        for d in report["generalDiagnostics"]
        if d["severity"] == "error"
    ]
    assert not errors, "\n".join(errors)
