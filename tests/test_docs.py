"""The documents agree with the code they describe: the README's settings table is generated from
`OGPSAArguments`, its recipe table names exactly the shipped recipes, and its links resolve.

    python tests/test_docs.py --write     regenerate the README's settings table after changing a field
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


def _settings_block(text: str) -> str:
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:stop].strip("\n")


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def test_readme_settings_table_is_generated_from_the_dataclass():
    from ogpsa.plugin.settings import settings_markdown, user_fields

    block = _settings_block(README.read_text(encoding="utf-8"))
    assert block == settings_markdown(), "README settings table is stale: run `python tests/test_docs.py --write`"
    assert len(block.splitlines()) == 2 + len(user_fields())


def test_readme_recipe_table_names_every_shipped_recipe():
    text = README.read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `recipes/([\w.]+\.yaml)` \|", text, flags=re.M))
    shipped = {p.name for p in (ROOT / "recipes").glob("*.yaml")}
    # the task fine-tuning recipe is documented with its results, not among the safety pipelines
    assert listed == shipped - {"smollm2_task_keep_safety.yaml"}


def test_document_links_resolve():
    for doc in [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "DESIGN.md", ROOT / "benchmarks" / "README.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
            if target.startswith("http"):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            assert dest.exists(), f"{doc.name}: link to missing {target}"
            if anchor:
                titles = re.findall(r"^#+ (.+)$", dest.read_text(encoding="utf-8"), flags=re.M)
                assert anchor in {_anchor(t) for t in titles}, f"{doc.name}: no heading for #{anchor} in {path}"


def test_readme_is_a_short_manual():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 300


def _markers() -> tuple[set[str], str]:
    """(the registered pytest markers, the default selection of addopts) from pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    block = text[text.index("[tool.pytest.ini_options]"):]
    listed = block[block.index("markers = ["):block.index("\n]")]
    names = set(re.findall(r'^\s+"(\w+): ', listed, flags=re.M))
    return names, re.search(r"addopts = \"-m '([^']+)'", block).group(1)


def test_test_commands_name_registered_markers_and_run_what_the_default_leaves_out():
    """Every `-m` selection the documents and scripts give names registered markers, and `run.sh test`
    runs, after the default suite, exactly the markers the default leaves out (but slow and gpu), and
    none of them that is also slow (a torchrun case kept out of CI)."""
    names, default = _markers()
    assert {"multiprocess", "long", "slow", "gpu"} <= names
    words = {"and", "or", "not"}
    selection = re.compile(r"pytest\b[^\n`]*? -m (?!pytest\b)(?:'([^']+)'|\"([^\"]+)\"|(\w+))")  # -m EXPR of a pytest command
    for path in [README, ROOT / "run.sh", ROOT / ".ci" / "run", *sorted((ROOT / "docs").glob("*.md")),
                 ROOT / "benchmarks" / "README.md", ROOT / "DESIGN.md"]:
        for single, quoted, bare in selection.findall(path.read_text(encoding="utf-8")):
            used = set(re.findall(r"\w+", single or quoted or bare)) - words
            assert used <= names, f"{path.name}: -m {single or quoted or bare} names unregistered markers"
    left_out = set(re.findall(r"not (\w+)", default)) - {"slow", "gpu"}
    second = re.search(r"pytest -q -p no:cacheprovider -m '([^']+)'", (ROOT / "run.sh").read_text()).group(1)
    assert second.replace(" and not slow", "") != second  # the slow ones stay out of CI's second pass
    second = second.replace(" and not slow", "").strip("()")
    assert set(re.findall(r"\w+", second)) - words == left_out and set(re.findall(r"\w+", second)) & words == {"or"}


def _write() -> None:
    from ogpsa.plugin.settings import settings_markdown

    text = README.read_text(encoding="utf-8")
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    README.write_text(text[:start] + "\n" + settings_markdown() + "\n" + text[stop:], encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        _write()
    else:
        sys.exit("usage: python tests/test_docs.py --write")
