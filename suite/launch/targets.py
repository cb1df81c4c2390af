"""The ``_target_`` guard: a config may instantiate exactly what the suite's configs need.

Hydra instantiates any ``_target_`` it finds (callbacks, launchers, sweepers), so a command-line
override or a shared preset could name any importable callable, and even a function of the
suite's own (one that renames or deletes files) would run. Every ``_target_`` anywhere in a
composed config must therefore be one of an explicit list: the launchers the suite supports
(one per row of its launcher table), Hydra's basic sweeper, and the suite's declared config
targets. Nothing is imported to decide.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from suite.launch.launchers import TARGETS

# The classes the suite's configs instantiate, and nothing else: the supported launchers (one
# per row of suite/launch/launchers.py), the sweeper every sweep runs under, and the
# end-of-sweep callback.
ALLOWED_TARGETS = TARGETS | {
    "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
    "suite.analyze.collect.CollectCallback",  # conf/config.yaml
}
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


class ForbiddenTarget(ValueError):
    """A ``_target_`` that names something the suite will not instantiate."""


def check_target(path: str) -> None:
    """Raise ForbiddenTarget unless ``path`` is one of :data:`ALLOWED_TARGETS`."""
    if not isinstance(path, str) or not _DOTTED.match(path):
        raise ForbiddenTarget(f"must be a dotted name (got {path!r})")
    if path not in ALLOWED_TARGETS:
        raise ForbiddenTarget(
            f"{path!r} is not one of the classes the suite's configs instantiate (its launchers, "
            "Hydra's basic sweeper, suite.analyze.collect.CollectCallback)"
        )


def targets(node: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every (key path, value) of a ``_target_`` key in a config, at any depth, unresolved."""
    if isinstance(node, DictConfig | ListConfig):
        node = OmegaConf.to_container(node, resolve=False)
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                found.append((where, value))
            else:
                found.extend(targets(value, where))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.extend(targets(value, f"{path}[{index}]"))
    return found


def check_config(cfg: Any) -> None:
    """Check every ``_target_`` of a composed config; raises ForbiddenTarget naming its key."""
    for where, value in targets(cfg):
        try:
            check_target(value)
        except ForbiddenTarget as error:
            raise ForbiddenTarget(f"{where}: {error}") from None
