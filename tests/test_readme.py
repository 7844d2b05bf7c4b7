"""Every python block of the README is executed, so it cannot rot; the docs pages the code, README and
tests cite exist, their links resolve, and every source folder is packaged."""
import contextlib
import importlib.util
import io
import pathlib
import re
import tomllib
import unittest

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS_REF = re.compile(r"docs/[\w/]+\.md")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")


NO_RUN = re.compile(r"<!-- no-run: (.*?) -->\s*$")


def readme_python_blocks():
    """``[(line, code, no_run_reason or None)]`` of every ```python block of README.md; a block
    is exempt only when the line right before it is ``<!-- no-run: reason -->``."""
    lines = (ROOT / "README.md").read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            m = NO_RUN.match(lines[i - 1].strip()) if i else None
            blocks.append((i + 1, "\n".join(lines[i + 1:j]) + "\n", m.group(1) if m else None))
            i = j
        i += 1
    return blocks


def test_readme_python_blocks_are_found_and_rarely_exempt():
    """The README has its python examples, and a block is exempt from running only with a
    stated reason (a block that needs a trained run); exempt blocks must still compile."""
    blocks = readme_python_blocks()
    assert len(blocks) >= 4, f"expected the README's python examples, found {len(blocks)}"
    exempt = [(line, why) for line, _, why in blocks if why is not None]
    assert len(exempt) <= 1 and all(why.strip() for _, why in exempt), exempt
    for line, code, _ in blocks:
        compile(code, f"README.md:{line}", "exec")


@pytest.mark.parametrize("line, code", [pytest.param(line, code, id=f"README.md:{line}")
                                        for line, code, why in readme_python_blocks() if why is None])
def test_readme_python_block_runs(line, code, capsys):
    """Every non-exempt ```python block of the README runs as written (each in a fresh namespace,
    with jax's default 32-bit types unless the block enables 64-bit ones); a block defining
    ``unittest.TestCase`` classes also has its tests run and passing."""
    ns = {"__name__": f"readme_block_{line}"}
    # as in a fresh process (64-bit types off), unless the block turns them on itself
    with contextlib.nullcontext() if "jax_enable_x64" in code else jax.enable_x64(False):
        exec(compile(code, f"README.md:{line}", "exec"), ns)
    cases = [v for v in ns.values() if isinstance(v, type)
             and issubclass(v, unittest.TestCase) and v.__module__ == ns["__name__"]]
    for case in cases:
        result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(
            unittest.defaultTestLoader.loadTestsFromTestCase(case))
        assert result.testsRun > 0 and result.wasSuccessful(), (
            f"README.md:{line} {case.__name__}: {result.failures + result.errors}")
    if line == readme_python_blocks()[0][0]:  # the quickstart prints both comparisons
        out = capsys.readouterr().out
        assert "chunked vs recurrent:" in out and "equivalence vs 'recurrent'" in out


def _package_dirs():
    """Where tttla_jax, tttla_jax.kernels and tttla_jax.train are installed (editable or not)."""
    dirs = []
    for name in ("tttla_jax", "tttla_jax.kernels", "tttla_jax.train"):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations, f"{name} is not installed"
        dirs += [pathlib.Path(p) for p in spec.submodule_search_locations]
    return dirs


def _cited_docs(paths):
    hits = {}
    for path in paths:
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for ref in DOCS_REF.findall(line):
                hits.setdefault(ref, []).append(f"{path}:{n}")
    return hits


def test_docs_pages_cited_anywhere_exist():
    """Every ``docs/….md`` named in the installed package (docstrings, error messages), the
    README, the benchmarks or the tests is a page of docs/."""
    files = [p for d in _package_dirs() for p in d.rglob("*.py")]
    files += [ROOT / "README.md"] + sorted((ROOT / "benchmarks").rglob("*.py"))
    files += sorted((ROOT / "tests").rglob("*.py"))
    hits = _cited_docs(files)
    assert "docs/linear_attention.md" in hits, "expected the package to cite docs pages"
    missing = {ref: where for ref, where in hits.items() if not (ROOT / ref).is_file()}
    assert not missing, "cited docs pages that do not exist:\n" + "\n".join(
        f"  {ref}  (cited at {', '.join(where[:3])}{' …' if len(where) > 3 else ''})"
        for ref, where in sorted(missing.items()))


def test_markdown_links_resolve():
    """Relative links in README.md and docs/ point at files that exist."""
    broken = []
    for md in [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md")):
        for n, line in enumerate(md.read_text().splitlines(), 1):
            for target in MD_LINK.findall(line):
                if re.match(r"[a-z]+:", target) or target.startswith("#"):
                    continue
                path = target.split("#", 1)[0]
                if not (md.parent / path).exists():
                    broken.append(f"{md.relative_to(ROOT)}:{n}: {target}")
    assert not broken, "broken links:\n  " + "\n  ".join(broken)


def test_docs_index_lists_every_page():
    index = (ROOT / "docs" / "index.md").read_text()
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    unlisted = [p for p in pages if p != "index.md" and f"({p})" not in index]
    assert not unlisted, f"docs/index.md does not link {unlisted}"


def test_every_source_folder_is_packaged():
    """pyproject.toml lists every package folder (a new subpackage would otherwise be
    missing from a non-editable install)."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    where = {name: ROOT / d for name, d in tool.get("package-dir", {}).items()}
    where.setdefault("tttla_jax", ROOT / "tttla_jax")
    found = set()
    for name, base in where.items():
        for init in base.rglob("*.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(base).parts
            found.add(".".join((name,) + rel))
    missing = sorted(found - listed)
    assert not missing, f"pyproject.toml [tool.setuptools] packages is missing {missing}"
    assert "train" not in listed, "train must be installed as tttla_jax.train, not top level"


def _docs_pages_with_python():
    return [md for md in sorted((ROOT / "docs").rglob("*.md")) if "```python\n" in md.read_text()]


def test_docs_have_python_examples():
    blocks = sum(len(re.findall(r"```python\n(.*?)```", md.read_text(), flags=re.S))
                 for md in _docs_pages_with_python())
    assert blocks >= 2, f"expected runnable examples in docs/, found {blocks}"


@pytest.mark.parametrize("md", [pytest.param(md, id=str(md.relative_to(ROOT)))
                                for md in _docs_pages_with_python()])
def test_docs_python_blocks_run(md):
    """Every ```python block of a docs/ page runs as written (a page's blocks in one namespace)."""
    ns = {}
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", md.read_text(), flags=re.S)):
        exec(compile(block, f"{md.relative_to(ROOT)}:block{i}", "exec"), ns)


def test_repository_paths_named_in_readme_and_docs_exist():
    """Files of the repository named in README.md or docs/ (``tttla_jax/…``, ``tests/…``,
    ``benchmarks/…``, …) exist — a renamed module leaves no stale pointer behind."""
    path_re = re.compile(r"(?<![\w./])((?:tttla_jax|kernels|train|benchmarks|tests|notebooks|docs)"
                         r"/[\w./-]*\w)")
    stale = []
    for md in [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md")):
        for n, line in enumerate(md.read_text().splitlines(), 1):
            for ref in path_re.findall(line):
                if "*" in ref or ref.startswith("benchmarks/results/") and not (ROOT / ref).exists():
                    continue  # globs; result files written by a run
                if not (ROOT / ref).exists():
                    stale.append(f"{md.relative_to(ROOT)}:{n}: {ref}")
    assert not stale, "paths that do not exist:\n  " + "\n  ".join(stale)
