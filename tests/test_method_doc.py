"""docs/method.md stays the complete description of MethodOptions, and the code cites only
documents that are in the repository."""
from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from model.options import MethodOptions

ROOT = Path(__file__).resolve().parents[1]
METHOD_DOC = (ROOT / "docs" / "method.md").read_text()


def test_every_method_option_is_documented_with_its_default() -> None:
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| ([^|]+) \|", METHOD_DOC, re.M)}
    for f in fields(MethodOptions):
        assert f.name in rows, f"docs/method.md has no table row for MethodOptions.{f.name}"
        default = getattr(MethodOptions(), f.name)
        shown = rows[f.name].strip().strip("`")
        expected = {True: "on", False: "off"}.get(default, default) if isinstance(default, bool) else default
        assert shown in (str(expected), f'"{expected}"'), (f.name, shown, default)


def test_docs_cited_by_the_code_exist_and_nothing_outside_the_repository_is_cited() -> None:
    sections = set(re.findall(r"^## (.+)$", METHOD_DOC, re.M))
    outside = re.compile(r"method doc|ntt_method|ls_protocol|ls_live_server|runtime\.md|runtime doc|\.\./shared|"
                         r"shared/docs|§")
    for path in [*ROOT.glob("model/*.py"), *ROOT.glob("backend/*.py"), *ROOT.glob("bench/*.py"),
                 *ROOT.glob("scripts/*"), *ROOT.rglob("tests/**/*.py")]:
        if path.name == Path(__file__).name:
            continue
        text = path.read_text()
        assert not outside.search(text), f"{path.relative_to(ROOT)} cites a document outside the repository"
        for section in re.findall(r'docs/method\.md, "([^"]+)"', text):
            assert section in sections, f"{path.relative_to(ROOT)} cites a missing section {section!r}"
