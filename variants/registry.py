"""The one registry of variants: built-ins and plugins register the same way.

Built-ins use the :func:`register` decorator at import. Installed third-party packages expose
their variant modules through the ``stability_suite.variants`` entry-point group; importing the
module runs the same decorator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import entry_points

from variants.base import Variant

ENTRY_POINT_GROUP = "stability_suite.variants"

log = logging.getLogger(__name__)

_variants: dict[str, type[Variant]] = {}
_plugins_loaded = False
plugin_failures: dict[str, str] = {}


class UnknownVariantError(KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def _source(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register(name: str) -> Callable[[type[Variant]], type[Variant]]:
    """Class decorator: make ``cls`` available as ``+variant=<name>``."""

    def decorate(cls: type[Variant]) -> type[Variant]:
        existing = _variants.get(name)
        if existing is not None and _source(existing) != _source(cls):
            raise ValueError(
                f"variant {name!r} is registered twice: by {_source(existing)} "
                f"and by {_source(cls)}"
            )
        cls.name = name
        _variants[name] = cls
        return cls

    return decorate


def load_plugins() -> None:
    """Import every entry point in the plugin group once; a broken plugin is reported, not fatal."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except Exception as error:  # a broken plugin must not take the built-ins down with it
            plugin_failures[entry_point.name] = f"{type(error).__name__}: {error}"
            log.warning("variant plugin %r failed to load: %s", entry_point.name, error)


def names() -> list[str]:
    load_plugins()
    return sorted(_variants)


def get(name: str) -> type[Variant]:
    load_plugins()
    try:
        return _variants[name]
    except KeyError:
        raise UnknownVariantError(
            f"unknown variant {name!r}; registered variants: {', '.join(names())}"
        ) from None
