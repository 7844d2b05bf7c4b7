"""The installed package and the README cite only what a user of the package can read:
the paper (arXiv 2602.21204), the original papers, or the repository's own docs/ pages —
never the project's internal planning notes ("SPEC …") or tracker numbers ("issue 5").

The package is located with importlib wherever it is installed (editable or not): the
``tttla_jax`` package, its ``tttla_jax.kernels`` and ``tttla_jax.train`` subpackages (or a
top-level ``train`` package where one is still installed).
"""
import importlib.util
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]

PATTERNS = {
    "SPEC reference": re.compile(r"\bSPEC"),
    "issue reference": re.compile(r"\bissues?\s*#?\s*\d+", re.IGNORECASE),
}
SUFFIXES = {".py", ".pyi", ".md", ".txt", ".toml", ".json", ".cfg"}


def _package_dirs():
    dirs = {}
    for name in ("tttla_jax", "tttla_jax.kernels", "tttla_jax.train", "train"):
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            spec = None
        if spec is None or not spec.submodule_search_locations:
            continue
        for p in spec.submodule_search_locations:
            dirs[pathlib.Path(p).resolve()] = name
    return dirs


def _files():
    dirs = _package_dirs()
    names = set(dirs.values())
    assert {"tttla_jax", "tttla_jax.kernels"} <= names, f"package not found: located {sorted(names)}"
    assert names & {"tttla_jax.train", "train"}, f"training package not found: located {sorted(names)}"
    files = {ROOT / "README.md"}
    for d in dirs:
        files |= {p for p in d.rglob("*") if p.suffix in SUFFIXES and "__pycache__" not in p.parts
                  and p.is_file()}
    return sorted(files)


def _hits(files):
    hits = []
    for path in files:
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for what, pat in PATTERNS.items():
                m = pat.search(line)
                if m:
                    hits.append(f"{path}:{n}: {what} {m.group(0)!r}: {line.strip()[:120]}")
    return hits


def test_patterns_catch_what_they_should():
    spec, issue = PATTERNS["SPEC reference"], PATTERNS["issue reference"]
    for s in ("see SPEC §3.2", "SPEC.md", "(SPEC: eq. 4)"):
        assert spec.search(s), s
    for s in ("issue 5", "Issue #14", "issues 3 and 4", "see issue#7"):
        assert issue.search(s), s
    for s in ("INSPECTION", "PartitionSpec", "importlib.util.find_spec", "a tissue 3", "no issues here",
              "arXiv 2602.21204 §5"):
        assert not spec.search(s) and not issue.search(s), s


def test_package_and_readme_cite_no_internal_documents():
    files = _files()
    assert any(p.name == "testing.py" for p in files) and any(p.name == "README.md" for p in files)
    hits = _hits(files)
    assert not hits, (f"{len(hits)} internal reference(s) in the installed package / README "
                      "(cite the paper, the original papers or a docs/ page instead):\n  " + "\n  ".join(hits))
