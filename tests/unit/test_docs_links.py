"""The documentation holds together: every relative link of README.md and docs/*.md reaches an existing file
and, with a #fragment, an existing heading; every docs/*.md that the code, configs or docs name exists, and a
named section ("docs/method.md section 3", 'docs/architecture.md, "vLLM on CPU"') is a heading of it; nothing
points at notes a user of the repository does not have."""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCES = (".py", ".md", ".yaml", ".yml", ".lua", ".sh", ".txt", ".toml", ".cfg")
SKIP_DIRS = {"runs", "results", "__pycache__", "node_modules"}

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
DOC_NAME = re.compile(r"docs/([A-Za-z0-9_-]+\.md)")
METHOD_SECTION = re.compile(r"docs/method\.md,? sections? (\d+)(?:-(\d+))?")
TITLED_SECTION = re.compile(r"docs/([A-Za-z0-9_-]+\.md),? \"([^\"]+)\"")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (word characters, spaces and hyphens
    kept), spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def headings(path: Path) -> list[str]:
    return HEADING.findall(FENCE.sub("", path.read_text()))


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in headings(path):
        s = slug(h)
        n = seen.get(s, 0)
        out.add(s if n == 0 else f"{s}-{n}")
        seen[s] = n + 1
    return out


def repository_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS]
        for name in files:
            path = Path(folder) / name
            if path.suffix in SOURCES or name == "Makefile":
                yield path


def test_slug_follows_github():
    assert slug("7. The demo, `make run`: its time and its result") == "7-the-demo-make-run-its-time-and-its-result"
    assert slug("1. Sample efficiency: `benchmarks/sample_efficiency.py` (issue 18)") == (
        "1-sample-efficiency-benchmarkssample_efficiencypy-issue-18")
    assert slug("Receipts, not payloads") == "receipts-not-payloads"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{fragment}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_named_docs_and_sections_exist():
    missing = []
    method_numbers = {h.split(".")[0] for h in headings(ROOT / "docs" / "method.md") if h[0].isdigit()}
    for path in repository_files():
        text = path.read_text(errors="replace")
        where = str(path.relative_to(ROOT))
        for name in DOC_NAME.findall(text):
            if not (ROOT / "docs" / name).exists():
                missing.append(f"{where}: docs/{name}")
        for first, last in METHOD_SECTION.findall(text):
            for n in range(int(first), int(last or first) + 1):
                if str(n) not in method_numbers:
                    missing.append(f"{where}: docs/method.md section {n}")
        for name, title in TITLED_SECTION.findall(text):
            doc = ROOT / "docs" / name
            if doc.exists() and title not in headings(doc):
                missing.append(f'{where}: docs/{name} "{title}"')
    assert not missing, missing


def test_no_reference_to_notes_users_do_not_have():
    names = [f"{n}.md" for n in ("AVATAR", "DESIGN", "STACK")]
    found = [f"{p.relative_to(ROOT)}: {n}" for p in repository_files() for n in names
             if n in p.read_text(errors="replace")]
    assert not found, found
