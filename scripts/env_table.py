"""The README's environment variable table, generated from backend/settings.py so it stays in sync.

    .venv/bin/python scripts/env_table.py            # print it
    .venv/bin/python scripts/env_table.py --update   # rewrite the table in README.md
tests/test_docker_files.py fails when README.md and this output differ.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.settings import env_table  # noqa: E402

START, END = "<!-- env-table:start -->", "<!-- env-table:end -->"
_BLOCK = re.compile(re.escape(START) + r"\n(.*?)\n" + re.escape(END), re.S)


def readme_table(text: str) -> str:
    """The table between the markers in README text (ValueError if the markers are missing)."""
    match = _BLOCK.search(text)
    if match is None:
        raise ValueError(f"README has no {START} ... {END} block")
    return match.group(1)


def with_table(text: str, table: str) -> str:
    readme_table(text)  # the markers must exist
    return _BLOCK.sub(lambda _: f"{START}\n{table}\n{END}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="rewrite the table in README.md")
    args = parser.parse_args(argv)
    if args.update:
        readme = ROOT / "README.md"
        readme.write_text(with_table(readme.read_text(), env_table()))
    else:
        print(env_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
