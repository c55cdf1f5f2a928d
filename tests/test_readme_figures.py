"""Every figure the README, docs/ and benchmarks/RESULTS.md quote from a benchmark RESULTS file matches it.

How a figure is marked as quoted (in README.md and docs/*.md):

* a markdown link whose target is a RESULTS file: ``[0.98](benchmarks/RESULTS_streaming.md)``, or with
  words around the numbers, ``[1.01 and 1.02](../benchmarks/RESULTS_streaming_cache2.md)``: every
  number in the link text is a quoted figure;
* a table preceded by ``<!-- figures: benchmarks/RESULTS_quality.md -->`` (the path relative to the doc): every number in the
  table's body rows (not its header) is a quoted figure.

A figure matches when the RESULTS file contains the same number as a token (thousands separators
ignored, ``+`` ignored, a minus sign kept, Unicode minus = hyphen; a hyphen between two numbers is a
range, not a sign). So quote figures as the RESULTS file writes them (1.201, not 1.2). When a benchmark
is re-run and its RESULTS file changes, every figure the docs quote from it that is no longer in the
file fails here, naming the doc, the figure and the file. Figures that no RESULTS file holds (test
bounds, byte counts by construction) are not marked and not checked.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LINK = re.compile(r"\[([^\[\]]+)\]\(([^)\s#]*RESULTS[^)\s#]*\.md)(?:#[^)\s]*)?\)")
TABLE_MARK = re.compile(r"<!--\s*figures:\s*(\S+)\s*-->")
NUMBER = re.compile(r"(?<![\w.])([-−+]?)(\d[\d,]*\d|\d)(\.\d+)?")


def numbers(text: str) -> list[str]:
    """The numbers of ``text``, normalised: no thousands separators, no ``+``, ``-`` for a minus sign."""
    return [("-" if m.group(1) in ("-", "−") else "") + m.group(2).replace(",", "") + (m.group(3) or "")
            for m in NUMBER.finditer(text)]


def doc_files(root: Path) -> list[Path]:
    """README, docs/ and the benchmarks' summary page (which quotes the per-benchmark RESULTS files)."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "benchmarks" / "RESULTS.md"]


def quoted_figures(doc: Path) -> list[tuple[str, Path, str]]:
    """(figure, RESULTS file it is quoted from, the quoting text) for every marked figure of ``doc``."""
    text = doc.read_text()
    found = []
    for m in LINK.finditer(text):
        target = (doc.parent / m.group(2)).resolve()
        found += [(num, target, m.group(0)) for num in numbers(m.group(1))]
    lines = text.splitlines()
    for i, line in enumerate(lines):
        mark = TABLE_MARK.search(line)
        if not mark:
            continue
        target = (doc.parent / mark.group(1)).resolve()
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        table = []
        while j < len(lines) and lines[j].lstrip().startswith("|"):
            table.append(lines[j])
            j += 1
        assert len(table) >= 3, f"{doc.name}: the figures marker at line {i + 1} is not followed by a table"
        for row in table[2:]:  # skip the header and the separator
            found += [(num, target, row.strip()) for num in numbers(row)]
    return found


def check_figures(root: Path) -> tuple[list[str], dict[Path, int]]:
    """Problems (one line each) and the number of quoted figures per RESULTS file."""
    problems, counts, cache = [], {}, {}
    for doc in doc_files(root):
        for num, target, context in quoted_figures(doc):
            if target not in cache:
                if not target.is_file():
                    problems.append(f"{doc.relative_to(root)}: cites {target.name}, which does not exist")
                    cache[target] = set()
                else:
                    cache[target] = set(numbers(target.read_text()))
            counts[target] = counts.get(target, 0) + 1
            if target.is_file() and num not in cache[target]:
                problems.append(f"{doc.relative_to(root)}: {num} is not in {target.name} (quoted in: {context[:120]})")
    return problems, counts


def test_number_parsing():
    assert numbers("0.88-1.07, −0.063 vs -0.036; +0.157 ± 0.017; 1,289x; 5,878-5,913; 2^24; 1e8.") == [
        "0.88", "1.07", "-0.063", "-0.036", "0.157", "0.017", "1289", "5878", "5913", "2", "24", "1"]


def test_quoted_figures_match_their_results_files():
    problems, counts = check_figures(ROOT)
    assert not problems, "figures that no longer match their RESULTS file:\n" + "\n".join(problems)
    cited = {p.name for p in counts}
    # The README's measured results quote these; a doc edit that drops the marks would make the test vacuous.
    assert {"RESULTS_quality.md", "RESULTS_sampler.md", "RESULTS_streaming.md"} <= cited, cited
    assert sum(counts.values()) >= 100, counts


def copy_docs(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "README.md", root / "README.md")
    shutil.copytree(ROOT / "docs", root / "docs")
    for f in (ROOT / "benchmarks").glob("RESULTS*.md"):
        shutil.copy(f, root / "benchmarks" / f.name)
    return root


def replace_number(text: str, old: str, new: str) -> str:
    """``text`` with every occurrence of the number ``old`` (as a whole token, any sign) replaced by ``new``."""
    digits = old.lstrip("-")
    pattern = re.compile(r"(?<![\w.,])" + re.escape(digits) + r"(?![\d,]*\d)(?!\.\d)")
    out = pattern.sub(new, text)
    assert out != text, old
    return out


@pytest.mark.parametrize("results", ["RESULTS_sampler.md", "RESULTS_quality.md", "RESULTS_streaming.md"])
def test_a_changed_results_file_fails_until_the_docs_follow(tmp_path, results):
    root = copy_docs(tmp_path)
    target = (root / "benchmarks" / results).resolve()
    quoted = [num for doc in doc_files(root) for num, t, _ in quoted_figures(doc) if t == target]
    # A figure specific enough to identify (has decimals), planted as a re-run would change it.
    figure = next(num for num in quoted if "." in num and len(num.lstrip("-")) >= 4)
    path = root / "benchmarks" / results
    path.write_text(replace_number(path.read_text(), figure, "9" + figure.lstrip("-")))
    problems, _ = check_figures(root)
    assert any(f"{figure} is not in {results}" in p for p in problems), problems


def test_a_changed_readme_figure_fails(tmp_path):
    root = copy_docs(tmp_path)
    readme = root / "README.md"
    text = readme.read_text()
    m = next(m for m in LINK.finditer(text) if "RESULTS_quality" in m.group(2))
    planted = m.group(0).replace(m.group(1), m.group(1) + "7", 1)  # e.g. 0.132 -> 0.1327
    readme.write_text(text.replace(m.group(0), planted, 1))
    problems, _ = check_figures(root)
    assert any(p.startswith("README.md:") and "RESULTS_quality.md" in p for p in problems), problems


def test_the_no_groups_log_note_quotes_its_results_files():
    """The note integrations log for class targets without groups quotes measured figures: each sentence's
    decimal figures are in the RESULTS file that sentence names (a re-run that moves them fails here)."""
    from irdro_sampler.integrations._class_targets import no_groups_note

    note = no_groups_note("(how)")
    checked = 0
    for sentence in re.split(r"(?<=[.;]) ", note):
        cited = re.findall(r"benchmarks/(RESULTS\w*\.md)", sentence)
        if not cited:
            continue
        have = set(numbers((ROOT / "benchmarks" / cited[0]).read_text()))
        figures = [n for n in numbers(sentence.replace(cited[0], "")) if "." in n]
        missing = [n for n in figures if n not in have]
        assert not missing, f"{missing} quoted in the note are not in {cited[0]}: {sentence}"
        checked += len(figures)
    assert checked >= 5, note
