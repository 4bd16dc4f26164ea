"""What every entry type's runtime has in common, and how an entry's type is read.

Each config entry records its type in ``entry.data["entry_type"]``
(:class:`~.const.EntryType`); ``__init__.py`` maps the type to a subclass of
:class:`EntryRuntime`, which becomes ``entry.runtime_data``. The runtime
remembers the data and options it was built from (:class:`EntrySource`), so the
entry's update listener reloads only when those change, not when the title or
the config subentries change (a broker entry applies those live). :func:`validation_error` builds the
translated errors the runtimes' actions raise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import copy
from dataclasses import dataclass
from typing import Any, ClassVar

from homeassistant.config_entries import ConfigEntry
from homeassistant.const import Platform
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import ServiceValidationError

from .const import CONF_ENTRY_TYPE, DOMAIN, EntryType

type MqttBridgeConfigEntry = ConfigEntry[EntryRuntime]


def entry_type_of(entry: ConfigEntry) -> EntryType | None:
    """Return the entry's type, or ``None`` when its ``entry_type`` is unknown.

    An entry without ``entry_type`` is a Meshtastic node: the only type that
    existed before 1.2 added the key. Such entries are migrated when set up,
    but a disabled entry is not (and its options and reconfigure flows must
    still work), and entries written by tools (``devkit/demo.py``) may lack it.
    ``None`` means an entry written by a newer version of the integration.
    """
    raw = entry.data.get(CONF_ENTRY_TYPE)
    if raw is None:
        return EntryType.MESHTASTIC_NODE
    try:
        return EntryType(raw)
    except ValueError:
        return None


def validation_error(key: str, **placeholders: str) -> ServiceValidationError:
    """Return the translated ``ServiceValidationError`` ``exceptions.<key>``."""
    return ServiceValidationError(
        translation_domain=DOMAIN,
        translation_key=key,
        translation_placeholders=placeholders or None,
    )


@dataclass(frozen=True, slots=True)
class EntrySource:
    """The config entry data and options a runtime was built from (deep copies)."""

    data: dict[str, Any]
    options: dict[str, Any]

    @classmethod
    def of(cls, entry: ConfigEntry) -> EntrySource:
        """Return a copy of ``entry``'s current data and options."""
        return cls(copy.deepcopy(dict(entry.data)), copy.deepcopy(dict(entry.options)))


class EntryRuntime(ABC):
    """The ``runtime_data`` of a loaded entry of one :class:`~.const.EntryType`.

    ``async_setup_entry`` builds it, forwards the entry to :attr:`platforms` and
    then calls :meth:`start`; everything it starts must be bound to the entry
    (``entry.async_create_background_task`` / ``entry.async_on_unload``) so that
    unloading the entry stops it.
    """

    # The entity platforms the entry is forwarded to.
    platforms: ClassVar[tuple[Platform, ...]]

    def __init__(self, hass: HomeAssistant, entry: ConfigEntry[Any]) -> None:
        """Remember the entry and what it holds now (see :meth:`needs_reload`).

        ``entry`` is typed by the subclass (e.g. ``ConfigEntry[NodeRuntime]``);
        ``ConfigEntry`` is invariant in its runtime data type.
        """
        self.hass = hass
        self.entry: ConfigEntry[Any] = entry
        self.source = EntrySource.of(entry)

    @abstractmethod
    def start(self) -> None:
        """Start the runtime's background work (after the platforms are set up)."""

    def needs_reload(self) -> bool:
        """Whether the entry's data or options differ from what the runtime uses."""
        return EntrySource.of(self.entry) != self.source
