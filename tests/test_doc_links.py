"""Every relative link in the project's markdown resolves, and the README stays short.

A link or image target (`[text](target)`, `![alt](target)`, `[ref]: target`) that is not a web or mail
address must name a file or folder that exists, relative to the markdown file that holds it. A `#anchor`
part (same-file `#x` or `other.md#x`) must equal the GitHub slug of a heading in the target file.
Links and headings inside fenced code blocks, and links inside inline code, do not count.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
OTHER_MARKDOWN = ("rewards/README.md", "kernels/README.md", "posttrain/default_model/README.md")
README_MAX_LINES = 300

SKIPPED_SCHEMES = ("http://", "https://", "mailto:")
FENCE = re.compile(r"^ *(`{3,}|~{3,})")
ATX_HEADING = re.compile(r"^ {0,3}#{1,6}(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
# Link text may hold one level of brackets and span lines; the target is `<...>` or has no spaces
# (one level of parentheses allowed), optionally followed by a title.
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]"
    r"\(\s*(<[^<>\n]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^()]*\)))?\s*\)"
)
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:[ \t]*(<[^<>\n]*>|\S+)", re.MULTILINE)
CODE_SPAN = re.compile(r"(`+)(?:(?!\n[ \t]*\n).)+?(?<!`)\1(?!`)", re.DOTALL)
MARKDOWN_LINK_IN_HEADING = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)")
HTML_TAG = re.compile(r"<[^>]+>")


def project_markdown_files() -> list[Path]:
    """README.md, everything under docs/, and the package READMEs."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    files += [ROOT / name for name in OTHER_MARKDOWN]
    return files


def github_slug(text: str) -> str:
    """GitHub's anchor for a heading's text (before de-duplication).

    Lowercase; drop every character that is not a letter, digit, space, hyphen or underscore (unicode
    letters kept); each space becomes a hyphen. Links in the heading count by their text, inline code by
    its content, HTML tags not at all.
    """
    text = MARKDOWN_LINK_IN_HEADING.sub(r"\1", text)
    text = HTML_TAG.sub("", text)
    kept = []
    for ch in text.lower():
        category = unicodedata.category(ch)
        if ch in " -_" or category.startswith("L") or category in ("Nd", "Mn", "Pc"):
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def unfenced_lines(text: str) -> list[str]:
    """The file's lines with every fenced code block (fences included) blanked, so line numbers hold."""
    lines = text.split("\n")
    out = []
    fence: str | None = None
    for line in lines:
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
                out.append("")
                continue
            out.append(line)
        else:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                    and not line.strip().strip(fence[0]):
                fence = None
            out.append("")
    return out


def headings(text: str) -> list[str]:
    """Heading texts outside fenced code blocks, in order (ATX `#` headings and setext underlines)."""
    found = []
    lines = unfenced_lines(text)
    for i, line in enumerate(lines):
        atx = ATX_HEADING.match(line)
        if atx:
            found.append((atx.group(1) or "").strip())
            continue
        previous = lines[i - 1] if i else ""
        if SETEXT_UNDERLINE.match(line) and previous.strip() and not ATX_HEADING.match(previous) \
                and not previous.lstrip().startswith(("|", "-", "*", "+", ">")):
            found.append(previous.strip())
    return found


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub gives the headings of a markdown file: duplicates get -1, -2, ..."""
    occurrences: dict[str, int] = {}
    result = set()
    for heading in headings(path.read_text(encoding="utf-8")):
        original = slug = github_slug(heading)
        while slug in occurrences:
            occurrences[original] += 1
            slug = f"{original}-{occurrences[original]}"
        occurrences[slug] = 0
        result.add(slug)
    return result


def link_targets(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link, image and reference definition outside code."""
    prose = "\n".join(unfenced_lines(text))
    prose = CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose)
    found = []
    for pattern in (INLINE_LINK, REFERENCE_DEFINITION):
        for match in pattern.finditer(prose):
            target = match.group(1)
            if target.startswith("<") and target.endswith(">"):
                target = target[1:-1]
            found.append((prose.count("\n", 0, match.start(1)) + 1, target))
    return sorted(found)


def is_broken(source: Path, target: str, root: Path) -> bool:
    """True when a relative target names no existing file or folder, or no heading of a markdown file."""
    path_part, _, anchor = target.partition("#")
    path_part = unquote(path_part)
    if not path_part:
        resolved = source
    elif path_part.startswith("/"):
        resolved = root / path_part.lstrip("/")
    else:
        resolved = source.parent / path_part
    if not resolved.exists():
        return True
    if not anchor:
        return False
    if resolved.is_dir():
        resolved = resolved / "README.md"
        if not resolved.is_file():
            return True
    if resolved.suffix.lower() != ".md":
        return False  # line anchors (#L10) in code files are GitHub's business
    return unquote(anchor) not in anchors(resolved)


def broken_links(files: list[Path], root: Path) -> list[str]:
    """`FILE:LINE: target` for every relative link in `files` that does not resolve."""
    broken = []
    for source in files:
        for line, target in link_targets(source.read_text(encoding="utf-8")):
            if not target or target.startswith(SKIPPED_SCHEMES):
                continue
            if is_broken(source, target, root):
                try:
                    name = source.relative_to(root).as_posix()
                except ValueError:
                    name = str(source)
                broken.append(f"{name}:{line}: {target}")
    return broken


def test_every_relative_link_resolves():
    files = project_markdown_files()
    missing = [str(f.relative_to(ROOT)) for f in files if not f.is_file()]
    assert not missing, f"markdown files this test expects are gone: {missing}"
    broken = broken_links(files, ROOT)
    assert not broken, f"{len(broken)} broken link(s):\n" + "\n".join(broken)


def test_the_checker_reports_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n")
    (tmp_path / "page.md").write_text(
        "# Page title\n"
        "\n"
        "Good: [top](#page-title), [other](other.md), [section](other.md#a-section), [web](https://x.invalid/).\n"
        "Broken file: [gone](missing.md).\n"
        "Broken anchor: [nowhere](other.md#no-such-section).\n"
        "\n"
        "```\n"
        "[inside a fence](also-missing.md)\n"
        "# not a heading\n"
        "```\n"
        "Not a heading either: [fenced](#not-a-heading), nor code: `[x](gone-too.md)`.\n"
    )
    broken = broken_links([tmp_path / "page.md"], tmp_path)
    assert broken == [
        "page.md:4: missing.md",
        "page.md:5: other.md#no-such-section",
        "page.md:11: #not-a-heading",
    ]


def test_github_slugs():
    assert github_slug("Does more compute close the gap? The main job's recipe (v4, validation)") == \
        "does-more-compute-close-the-gap-the-main-jobs-recipe-v4-validation"
    assert github_slug("Studio workflow: your footage -> a LoRA adapter -> the Hub") == \
        "studio-workflow-your-footage---a-lora-adapter---the-hub"
    assert github_slug("`posttrain eval` and [links](x.md)") == "posttrain-eval-and-links"
    assert github_slug("Über_größe 2") == "über_größe-2"


def test_duplicate_headings_get_numbered_anchors(tmp_path):
    page = tmp_path / "dup.md"
    page.write_text("# Notes\n\n## Notes\n\n## Notes\n\n```\n## Notes\n```\n")
    assert anchors(page) == {"notes", "notes-1", "notes-2"}


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; keep it under {README_MAX_LINES}"
