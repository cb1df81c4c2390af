"""List every registered variant: ``python -m variants``; with ``--recipes``, what
``recipe=authors`` adds to each (variants/base.py, Recipe) and where it comes from."""

from __future__ import annotations

import sys
import textwrap

import variants
from variants.registry import plugin_failures, source


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    rows = [(name, variants.get(name)) for name in variants.names()]
    width = max(len(name) for name, _ in rows)
    if "--recipes" in args:
        for name, cls in rows:
            recipe = cls().authors_recipe()
            verdict = "adds to the wiring" if recipe.changes_training else "= controlled"
            print(f"{name:<{width}}  {verdict}")
            text = recipe.source or "(declares no recipe)"
            print(textwrap.fill(text, 96, initial_indent=" " * 4, subsequent_indent=" " * 4))
        return
    origin_width = max(len(source(cls)) for _, cls in rows)
    for name, cls in rows:
        print(f"{name:<{width}}  {source(cls):<{origin_width}}  {cls.formula}")
    for name, error in plugin_failures.items():
        print(f"{name:<{width}}  FAILED TO LOAD: {error}")


if __name__ == "__main__":
    main()
