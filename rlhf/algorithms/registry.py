"""A name -> function table. Registering a name twice is an error; an unknown name lists the known ones.

An entry may declare traits (keyword arguments to `register`): facts about it that the config
validates against, e.g. what an advantage estimator reads or at which level a policy loss works.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    def __init__(self, kind: str):
        self.kind = kind
        self._fns: dict[str, F] = {}
        self._traits: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **traits: Any) -> Callable[[F], F]:
        def add(fn: F) -> F:
            if name in self._fns:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._fns[name].__qualname__})")
            self._fns[name] = fn
            self._traits[name] = traits
            return fn

        return add

    def __getitem__(self, name: str) -> F:
        try:
            return self._fns[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {sorted(self._fns)}") from None

    def trait(self, name: str, key: str) -> Any:
        """The trait `key` that `name` declared at registration (KeyError naming both if it did not)."""
        self[name]  # an unknown name: the usual error
        try:
            return self._traits[name][key]
        except KeyError:
            raise KeyError(f"{self.kind} {name!r} declares no {key!r}; it declares {sorted(self._traits[name])}") \
                from None

    def __contains__(self, name: object) -> bool:
        return name in self._fns

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._fns))
