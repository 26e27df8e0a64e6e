"""A tiny name -> factory registry, so that adding a network, corruption or SSL method is one file.

    NETWORKS = Registry("network")

    @NETWORKS.register("unet", description="MONAI UNet ...")
    def build_unet(...): ...

    NETWORKS.get("unet")            # the factory; unknown names raise ConfigError listing choices
    NETWORKS.names()                # sorted names
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List

from .errors import ConfigError


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    description: str
    tags: tuple


class Registry:
    """Maps a lower-case name to an object (class or function) with a one-line description."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Entry] = {}

    def register(self, name: str, description: str = "", tags: tuple = ()) -> Callable:
        key = name.lower()

        def decorator(obj):
            if key in self._entries:
                raise ValueError(f"{self.kind} '{key}' registered twice")
            doc = description or (obj.__doc__ or "").strip().splitlines()[0:1]
            text = doc if isinstance(doc, str) else (doc[0] if doc else "")
            self._entries[key] = Entry(key, obj, text, tuple(tags))
            return obj

        return decorator

    def get(self, name: str) -> Any:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry:
        key = str(name).lower()
        if key not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}"
            )
        return self._entries[key]

    def names(self) -> List[str]:
        return sorted(self._entries)

    def entries(self) -> Iterator[Entry]:
        return (self._entries[k] for k in self.names())

    def __contains__(self, name: str) -> bool:
        return str(name).lower() in self._entries

    def __len__(self) -> int:
        return len(self._entries)
