"""Default judge rubrics shipped as package data; users copy one, edit it, and point ``judge.rubric`` at the file.

A rubric is the judge's user message with ``{{prompt}}`` and ``{{response}}`` (pointwise) or ``{{prompt}}``,
``{{response_a}}`` and ``{{response_b}}`` (pairwise) placeholders, replaced literally (braces elsewhere, such as a
JSON example, are left alone). This module only finds and reads rubric files.
"""

from __future__ import annotations

from pathlib import Path

RUBRIC_DIR = Path(__file__).resolve().parent


def shipped() -> list[str]:
    return sorted(p.stem for p in RUBRIC_DIR.glob("*.md"))


def load_rubric(name_or_path: str) -> tuple[str, str]:
    """(where the rubric came from, its text): a file path, or the name of a shipped rubric."""
    path = Path(name_or_path)
    if path.is_file():
        return str(path), path.read_text(encoding="utf-8")
    candidate = RUBRIC_DIR / f"{name_or_path}.md"
    if candidate.is_file():
        return f"posttrain.judges.rubrics/{candidate.name}", candidate.read_text(encoding="utf-8")
    raise FileNotFoundError(f"judge.rubric: {name_or_path!r} is neither a file nor a shipped rubric ({', '.join(shipped())})")


def render(template: str, **values: str) -> str:
    for key, value in values.items():
        template = template.replace("{{" + key + "}}", value)
    return template
