"""List every registered variant: ``python -m variants``."""

from __future__ import annotations

import variants
from variants.registry import plugin_failures, source


def main() -> None:
    rows = [(name, variants.get(name)) for name in variants.names()]
    width = max(len(name) for name, _ in rows)
    origin_width = max(len(source(cls)) for _, cls in rows)
    for name, cls in rows:
        print(f"{name:<{width}}  {source(cls):<{origin_width}}  {cls.formula}")
    for name, error in plugin_failures.items():
        print(f"{name:<{width}}  FAILED TO LOAD: {error}")


if __name__ == "__main__":
    main()
