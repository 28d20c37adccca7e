"""What ghostfunc keeps per ``model_fn``, a bound method's kept by its object and function.

Every attribute access (``model.loss``) makes a new method object. Keyed by that object, what the first call learned
(checks, traces, the routing race) would go with it, and ``graddot(model.loss, ...)`` in a training loop would start
from nothing at every call (about 100x a call on a small MLP). A bound method is keyed instead by a stand-in that
lives exactly as long as its object: equal methods (the same object, the same function) find the same entries, and
the entries go when the object goes. Other callables are keyed by themselves, weakly, as before.
"""

from __future__ import annotations

import functools
import threading
import types
import weakref
from typing import Any, TypeVar


class _Bound:
    """The key of ``obj.method`` while ``obj`` lives (it holds the function, not the object)."""

    __slots__ = ("__weakref__", "func")

    def __init__(self, func: Any) -> None:
        self.func = func


#: ``id(obj)`` -> (a weak reference to ``obj``, {function: its key}); the entry goes when ``obj`` does.
_ANCHORS: dict[int, tuple[weakref.ref[Any], dict[Any, _Bound]]] = {}
_LOCK = threading.Lock()


def _drop(ident: int, ref: weakref.ref[Any]) -> None:
    with _LOCK:
        entry = _ANCHORS.get(ident)
        if entry is not None and entry[0] is ref:  # (not a later object at the same address)
            del _ANCHORS[ident]


def key_of(model_fn: Any) -> Any:
    """The key ``model_fn``'s entries are kept under: a stand-in for a bound method (one per object and function,
    living as long as the object), ``model_fn`` itself otherwise (and for a method whose object cannot be weakly
    referenced)."""
    if type(model_fn) is not types.MethodType:
        return model_fn
    obj, func = model_fn.__self__, model_fn.__func__
    ident = id(obj)
    entry = _ANCHORS.get(ident)
    if entry is None or entry[0]() is not obj:
        with _LOCK:
            entry = _ANCHORS.get(ident)
            if entry is None or entry[0]() is not obj:
                try:
                    ref = weakref.ref(obj, functools.partial(_drop, ident))
                except TypeError:
                    return model_fn
                entry = _ANCHORS[ident] = (ref, {})
    keys = entry[1]
    key = keys.get(func)
    if key is None:
        with _LOCK:
            key = keys.setdefault(func, _Bound(func))
    return key


def same_fn(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are the same ``model_fn`` (two method objects of one object and function are)."""
    return a is b or key_of(a) is key_of(b)


K = TypeVar("K")
V = TypeVar("V")


class ByModel(weakref.WeakKeyDictionary[K, V]):
    """A ``WeakKeyDictionary`` keyed by ``model_fn`` through :func:`key_of`."""

    def __getitem__(self, key: K) -> V:
        return super().__getitem__(key_of(key))

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key_of(key), value)

    def __delitem__(self, key: K) -> None:
        super().__delitem__(key_of(key))

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key_of(key))

    def get(self, key: K, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key_of(key), default)

    def setdefault(self, key: K, default: Any = None) -> Any:  # type: ignore[override]
        return super().setdefault(key_of(key), default)

    def pop(self, key: K, *default: Any) -> Any:  # type: ignore[override]
        return super().pop(key_of(key), *default)
