"""The README is the users' entry point: it starts with the two set-up commands, every link inside it
(to a section, or to a file of the repository) leads somewhere, and its Accuracy experiments list every
one of their sections."""

from __future__ import annotations

import re
from collections import Counter

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def headings(markdown: str) -> list[str]:
    """The text of every heading outside fenced code blocks."""
    found, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        match = re.match(r"#{1,6} (.+)$", line)
        if match and not fenced:
            found.append(match.group(1))
    return found


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation but hyphens dropped, spaces as
    hyphens, and -1, -2, ... after a repeated one."""
    seen: Counter[str] = Counter()
    result = set()
    for heading in headings(markdown):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        result.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return result


def test_anchors_follow_githubs_rule():
    text = "# Error by group: `evaluate --by gender,ethnicity`\n```\n# a comment\n```\n## Speed\n## Speed\n"
    assert anchors(text) == {"error-by-group-evaluate---by-genderethnicity", "speed", "speed-1"}


def test_every_link_to_a_section_of_the_readme_finds_it():
    known = anchors(README)
    links = re.findall(r"\]\(#([^)\s]+)\)", README)
    assert links, "the README links its sections"
    assert sorted({link for link in links if link not in known}) == []


def test_every_link_to_a_file_of_the_repository_finds_it():
    targets = re.findall(r"\]\((?!#|https?:|mailto:)([^)#\s]+)", README)
    assert targets
    assert sorted({t for t in targets if not (REPO / t).exists()}) == []


def test_the_readme_starts_with_the_pipeline_and_the_tests():
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    assert commands[0].startswith("./scripts/pipeline.sh ")
    assert commands[-1] == "./scripts/test.sh"
    assert (REPO / "scripts" / "pipeline.sh").is_file() and (REPO / "scripts" / "test.sh").is_file()


def test_the_accuracy_experiments_list_every_one_of_their_sections():
    part = README.split("\n## Accuracy experiments\n", 1)[1].split("\n## ", 1)[0]
    sections = [line[4:] for line in part.splitlines() if line.startswith("### ")]
    listed = re.findall(r"^\* \[(.+)\]\(#", part, re.M)
    assert sections and listed == sections
