"""The ``_target_`` guard: a config may instantiate only what the suite or Hydra define.

Hydra instantiates any ``_target_`` it finds (callbacks, launchers, sweepers), so a command-line
override can name any importable callable. Every ``_target_`` anywhere in a composed config is
resolved to the object it names, and allowed only when that object is defined (``__module__``)
in the suite's packages, or is a class defined in Hydra's. Names merely imported into an allowed
module (``suite.app.os.system``) are refused, and nothing outside the allowed packages is ever
imported to find out.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

SUITE_PACKAGES = ("suite", "variants")
HYDRA_PACKAGES = ("hydra", "hydra_plugins")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


class ForbiddenTarget(ValueError):
    """A ``_target_`` that names something the suite will not instantiate."""


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def _resolve(path: str) -> Any:
    """The object a dotted path names: the longest importable module prefix, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(f"no module in {path!r}")


def check_target(path: str) -> None:
    """Raise ForbiddenTarget unless ``path`` names a class or function defined in the suite's
    packages, or a class defined in Hydra's."""
    if not isinstance(path, str) or not _DOTTED.match(path):
        raise ForbiddenTarget(f"must be a dotted name (got {path!r})")
    if _top(path) not in SUITE_PACKAGES + HYDRA_PACKAGES:
        raise ForbiddenTarget(f"may only name the suite's own classes or Hydra's (got {path!r})")
    try:
        obj = _resolve(path)
    except (ImportError, AttributeError) as error:
        raise ForbiddenTarget(f"{path!r} cannot be found ({error})") from None
    defined_in = _top(getattr(obj, "__module__", None) or "")
    if inspect.isclass(obj) and defined_in in SUITE_PACKAGES + HYDRA_PACKAGES:
        return
    if inspect.isfunction(obj) and defined_in in SUITE_PACKAGES:
        return
    raise ForbiddenTarget(
        f"{path!r} is not a class or function defined in the suite or a class defined in Hydra "
        f"(it comes from {getattr(obj, '__module__', None) or 'elsewhere'!r})"
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
