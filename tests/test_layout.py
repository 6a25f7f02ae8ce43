"""The project as a user installs and runs it: installing claims one top-level name, a run
writes nothing into the checkout, and every file the code and the docs cite exists."""

import ast
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tokenize
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, SMALL_RUN


@pytest.mark.slow
def test_the_wheel_claims_only_the_optimizer_package(tmp_path):
    """``pip install`` puts ``lorenza`` in site-packages and nothing else: no ``data``,
    ``models`` or ``trainer`` to collide with a user's own packages of those names."""
    source = tmp_path / "source"  # a copy: setuptools writes build/ beside the sources
    shutil.copytree(
        ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "*.egg-info")
    )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("lorenza-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"lorenza", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    top_level = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["lorenza"]


def tree_files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (Python's bytecode caches aside) with its size and mtime."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.mark.slow
def test_a_run_writes_nothing_into_the_checkout(tmp_path):
    """``train.py`` from a read-only copy of the tree, with a cold cache: the sample
    tokenizer is trained into the user's cache, everything else goes to the run folder, and
    not one file of the tree is created or changed. (Read-only does not stop root, which
    CI may be: the file listing before and after is the check.)"""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    tree = tmp_path / "checkout"
    for name in files:
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    for p in [tree, *tree.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = tree_files(tree)
    env = {**os.environ, "LORENZA_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(tree)}
    try:
        run = subprocess.run(
            [sys.executable, "train.py", *SMALL_RUN, "trainer.max_steps=2",
             "trainer.save_every=1", f"trainer.run_dir={tmp_path / 'run'}"],
            cwd=tree, capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        assert tree_files(tree) == before
        assert list((tmp_path / "cache" / "tokenizers").glob("*/sp_bpe_8000.model"))
        assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    finally:
        for p in [tree, *tree.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


CITED = re.compile(
    r"(?<![\w./-])((?:lorenza|models|data|trainer|bench|experiments|tests|launch|configs|docs)"
    r"/[\w./-]*\w|train\.py|Makefile)"
)


def cited_paths(text: str) -> set[str]:
    """Repository paths named in ``text`` (``lorenza/zo.py``, ``docs/design.md``...)."""
    return {m.group(1) for m in CITED.finditer(text)}


def prose(source: Path) -> str:
    """What a person reads in ``source``: a Markdown file whole; of Python, its docstrings
    and comments (string literals in code may name files that must not exist)."""
    text = source.read_text()
    if source.suffix != ".py":
        return text
    tree = ast.parse(text)
    docs = [
        ast.get_docstring(node) or ""
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    comments = [
        tok.string
        for tok in tokenize.generate_tokens(io.StringIO(text).readline)
        if tok.type == tokenize.COMMENT
    ]
    return "\n".join(docs + comments)


def test_every_file_the_code_and_the_docs_cite_exists():
    """Docstrings, comments and Markdown name files to read; none may point at a file the
    repository does not hold (nor at anything outside it)."""
    outside = {".venv", ".git", "build", "site", "runs", "results", "node_modules"}
    sources = [  # the results files are records of commands as they were run
        p
        for p in ROOT.rglob("*")
        if p.suffix in (".py", ".md")
        and p.name != "RESULTS.md"
        and not outside & set(p.relative_to(ROOT).parts)
        and not any(part.endswith(".egg-info") for part in p.parts)
    ]
    missing = []
    for source in sources:
        text = prose(source)
        for path in cited_paths(text):
            clean = path.rstrip(".")
            if "*" in clean or "<" in clean:
                continue
            if not (ROOT / clean).exists() and not any(ROOT.glob(clean + "*")):
                missing.append(f"{source.relative_to(ROOT)}: {clean}")
        for outside in ("DESIGN.md", "STYLE.md", "ENVIRONMENT.md", "../shared"):
            if outside in text and source.name != "test_layout.py":
                missing.append(f"{source.relative_to(ROOT)}: {outside} (outside the repo)")
    assert not missing, "\n".join(missing)
