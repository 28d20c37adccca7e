"""Argument checks at the public boundary: every message names the function."""

from __future__ import annotations

import collections
import inspect
import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ._bymodel import ByModel
from ._capture import Batch, is_foreign_mapping, split_batch
from ._plan import POLICIES

VAL_REDUCE = ("mean", "sum", None)


_INFERENCE = ("was made under torch.inference_mode(): autograd cannot differentiate through it (torch refuses "
              "to save such a tensor for backward)")


def check_params(params: Any, where: str) -> dict[str, Tensor]:
    """A non-empty dict of floating-point tensors, detached (the caller's stay untouched); an ``nn.ParameterDict``
    counts as its dict."""
    if isinstance(params, torch.nn.ParameterDict):
        params = dict(params.items())
    if not isinstance(params, Mapping):
        raise TypeError(f"{where}: params must be a dict of tensors (name -> tensor); got {type(params).__name__}")
    if not params:
        raise ValueError(f"{where}: params is empty; pass the trainable tensors as a dict")
    out = {}
    for k, v in params.items():
        if not isinstance(k, str):
            raise TypeError(f"{where}: params keys must be strings; got {k!r}")
        if not isinstance(v, Tensor):
            raise TypeError(f"{where}: params[{k!r}] must be a tensor; got {type(v).__name__}")
        if not v.is_floating_point() or v.is_complex():
            raise TypeError(
                f"{where}: params[{k!r}] must be a real floating-point tensor to have gradients; got dtype {v.dtype}"
            )
        if v.device.type == "meta":
            raise ValueError(f"{where}: params[{k!r}] is on the meta device: it holds no values (load or "
                             f"materialise the weights first, e.g. model.to_empty(device=...) and then load them)")
        if v.is_inference():
            raise ValueError(f"{where}: params[{k!r}] {_INFERENCE}: pass params[{k!r}].clone(), made outside it")
        if isinstance(v, torch.nn.Parameter) and not v.requires_grad:
            raise ValueError(f"{where}: params[{k!r}] is a frozen nn.Parameter (requires_grad=False), which torch.optim "
                             f"would not train: leave it out of params (ghostfunc.from_module does), or pass "
                             f"params[{k!r}].detach() to differentiate it anyway")
        out[k] = v.detach()
    devices = {v.device for v in out.values()}
    if len(devices) > 1:
        first = next(iter(out))
        other = next(k for k, v in out.items() if v.device != out[first].device)
        raise ValueError(f"{where}: params must all be on one device; params[{first!r}] is on "
                         f"{out[first].device}, params[{other!r}] on {out[other].device}")
    return out


def check_batch(batch: Any, name: str, where: str) -> Batch:
    """A pytree whose tensor leaves share a non-empty leading sample axis (a ``Mapping`` such as
    ``transformers.BatchEncoding`` counts as a dict)."""
    try:
        split = split_batch(batch)
    except IndexError:  # a scalar leaf: the message below names it
        split = None
    except RecursionError:
        raise TypeError(f"{where}: {name} holds itself (a list or dict that contains itself, found while flattening "
                        f"it as a pytree); pass a batch of tensors and values without cycles") from None
    if split is not None and split.size > 0 and all(t.dim() > 0 and t.shape[0] == split.size
                                                    and t.layout == torch.strided and not t.is_inference()
                                                    and not t.is_meta for t in split.tensors):
        return split  # the common case, without the walk that names leaves in messages
    with_paths, _ = pytree.tree_flatten_with_path(_plain(batch))
    tensors = [(pytree.keystr(p), leaf) for p, leaf in with_paths if isinstance(leaf, Tensor)]
    if not tensors:
        raise TypeError(f"{where}: {name} must be a tensor or a pytree with tensor leaves; got {type(batch).__name__}")
    sizes = {}
    for path, t in tensors:
        if t.layout != torch.strided:
            raise TypeError(f"{where}: {name}{path} is a {t.layout} tensor; ghostfunc slices samples out of dense "
                            f"tensors: pass it dense ({name}{path}.to_dense()), or pass the indices and values "
                            f"as dense leaves and build the sparse tensor inside model_fn")
        if t.dim() == 0:
            raise ValueError(f"{where}: {name}{path} is a scalar; every tensor leaf needs a leading sample axis")
        if t.is_meta:
            raise ValueError(f"{where}: {name}{path} is on the meta device (shapes without values); pass the "
                             f"batch's real tensors")
        if t.is_inference():
            raise ValueError(f"{where}: {name}{path} {_INFERENCE}: pass {name}{path}.clone(), made outside it (or "
                             f"clone the batch's tensors where your data pipeline makes them)")
        sizes[path] = t.shape[0]
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name}{p}: {s}" for p, s in sizes.items())
        raise ValueError(f"{where}: the tensor leaves of {name} must share the sample axis (dim 0); got {listed}")
    if next(iter(sizes.values())) == 0:
        raise ValueError(f"{where}: {name} is empty (0 samples); it needs at least one sample")
    return split_batch(batch)


def check_pair(train: Any, val: Any, where: str) -> tuple[Batch, Batch]:
    tb, vb = check_batch(train, "train", where), check_batch(val, "val", where)
    if _flat(train) and _flat(val) and type(train) is type(val) and (isinstance(train, Tensor) or len(train) == len(val)):
        return tb, vb  # tensors, or tuples/lists of tensors of one length: the same structure
    ts, vs = pytree.tree_structure(_plain(train)), pytree.tree_structure(_plain(val))
    if ts != vs and pytree.tree_structure(keys_sorted(train)) == pytree.tree_structure(keys_sorted(val)):
        # The same keys in another order, or a BatchEncoding beside a dict: the same batch. Val's dicts take
        # train's key order (its rows then line up with train's where the two run as one batch).
        # (An OrderedDict beside a dict, a BatchEncoding beside a dict: each batch runs on its own.)
        return tb, check_batch(_ordered_like(val, train), "val", where)
    if ts != vs:
        lists = [*_sample_lists(train, "train", tb.size), *_sample_lists(val, "val", vb.size)]
        hint = (f"; {lists[0]} is a list of one non-tensor value per sample (DataLoader's default collate of a "
                f"text column, say): a list is structure here, not a sample axis, so its length must match too. "
                f"Leave it out of the batch (model_fn gets only what it computes with), or pass it as a tensor "
                f"(ids, codes)") if lists else ""
        at = _first_difference(train, val, "")
        raise ValueError(
            f"{where}: train and val must have the same structure (same container types and keys); "
            f"train is {describe_batch(train)}, val is {describe_batch(val)}{f' ({at})' if at else ''}{hint}"
        )
    return tb, vb


def _first_difference(a: Any, b: Any, path: str) -> str | None:
    """Where containers ``a`` (train's) and ``b`` (val's) first differ in type, keys or length, for a message
    (``"at ['x']: list in train, tuple in val"``); ``None`` where they do not (or only in leaves)."""
    here = path or "the top"
    containers = (Mapping, list, tuple)
    if not isinstance(a, containers) and not isinstance(b, containers):
        return None
    if type(a) is not type(b) and not (isinstance(a, Mapping) and isinstance(b, Mapping)):
        return f"at {here}: {type(a).__name__} in train, {type(b).__name__} in val"
    if isinstance(a, Mapping):
        if set(a) != set(b):
            return f"at {here}: keys {sorted(map(repr, a))} in train, {sorted(map(repr, b))} in val"
        pairs = [(f"{path}[{k!r}]", a[k], b[k]) for k in a]
    else:
        if len(a) != len(b):
            return f"at {here}: {len(a)} items in train, {len(b)} in val"
        pairs = [(f"{path}[{i}]", x, y) for i, (x, y) in enumerate(zip(a, b, strict=True))]
    for p, x, y in pairs:
        if (found := _first_difference(x, y, p)) is not None:
            return found
    return None


def _sample_lists(batch: Any, name: str, size: int) -> list[str]:
    """Paths (as ``name['text']``) of the lists or tuples in ``batch`` holding ``size`` values and no tensor or
    container: per-sample values that torch's pytree reads as structure."""
    found: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, (list, tuple)) and len(node) == size and size > 1 and \
                not any(isinstance(v, (Tensor, list, tuple, dict, Mapping)) for v in node):
            found.append(f"{name}{path}")
        elif isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{path}[{k!r}]")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(batch, "")
    return found


def _flat(batch: Any) -> bool:
    return isinstance(batch, Tensor) or (type(batch) in (tuple, list) and all(isinstance(t, Tensor) for t in batch))


def _plain(batch: Any) -> Any:
    """``batch`` with every ``Mapping`` torch's pytree does not know (``transformers.BatchEncoding``) as a dict."""
    return pytree.tree_map(lambda m: _plain(dict(m)) if is_foreign_mapping(m) else m, batch,
                           is_leaf=is_foreign_mapping)


def keys_sorted(batch: Any) -> Any:
    """``batch`` with every mapping a dict with its keys in sorted order (as a string where keys of several types
    cannot be compared): what :func:`check_pair` compares besides key order and mapping type."""
    def visit(node: Any) -> Any:
        if isinstance(node, Mapping):
            keys = list(node)
            try:
                keys.sort()
            except TypeError:
                keys.sort(key=repr)
            return {k: visit(node[k]) for k in keys}
        if type(node) in (list, tuple):
            return type(node)(visit(v) for v in node)
        if isinstance(node, tuple) and hasattr(type(node), "_fields"):  # a namedtuple
            return type(node)(*(visit(v) for v in node))
        return node

    return visit(batch)


def _ordered_like(val: Any, train: Any) -> Any:
    """``val`` with the keys of each of its plain dicts (``dict``, ``OrderedDict``) in the order of ``train``'s dict at
    the same place; a mapping of another type (``BatchEncoding``) is kept as it is (its batch runs on its own)."""
    if type(val) in (dict, collections.OrderedDict) and isinstance(train, Mapping) and val.keys() == train.keys():
        return type(val)((k, _ordered_like(val[k], train[k])) for k in train)
    if type(val) in (list, tuple) and type(train) is type(val) and len(val) == len(train):
        return type(val)(_ordered_like(v, t) for v, t in zip(val, train, strict=True))
    if isinstance(val, tuple) and hasattr(type(val), "_fields") and type(train) is type(val):  # a namedtuple
        return type(val)(*(_ordered_like(v, t) for v, t in zip(val, train, strict=True)))
    return val


def describe_batch(batch: Any) -> str:
    with_paths, _ = pytree.tree_flatten_with_path(_plain(batch))
    keys = [pytree.keystr(p) or "<root>" for p, _ in with_paths]
    return f"{type(batch).__name__} with leaves {keys}"


def check_options(where: str, val_reduce: Any = "mean", policy: Any = "auto", compute_dtype: Any = None) -> None:
    if val_reduce not in VAL_REDUCE:
        raise ValueError(f"{where}: val_reduce must be one of {VAL_REDUCE}; got {val_reduce!r}")
    if policy not in POLICIES:
        raise ValueError(f"{where}: policy must be one of {POLICIES}; got {policy!r}")
    if policy == "contract" and val_reduce is None:
        raise ValueError(
            f"{where}: policy='contract' contracts against one reduced validation gradient, "
            "so it needs val_reduce='mean' or 'sum'; got val_reduce=None"
        )
    if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
        raise TypeError(f"{where}: compute_dtype must be None or a floating torch.dtype; got {compute_dtype!r}")


def check_compile(where: str, compile: Any, val_reduce: Any, group: Any) -> None:
    if not isinstance(compile, bool):
        raise TypeError(f"{where}: compile must be True or False; got {compile!r}")
    if compile and val_reduce is None:
        raise ValueError(f"{where}: compile=True scores against one reduced validation gradient, so it needs "
                         f"val_reduce='mean' or 'sum'; got val_reduce=None")
    if compile and group is not None:
        raise ValueError(f"{where}: compile=True runs in one process; pass group=None or compile=False")


#: Python functions whose signature took ``(params, batch)``, with the code and defaults it was read from:
#: ``inspect.signature`` costs 2% of a small model's call (an MLP of width 64).
_BINDS: ByModel[Any, tuple] = ByModel()


def check_model_fn(model_fn: Any, where: str) -> None:
    if not callable(model_fn):
        raise TypeError(f"{where}: model_fn must be callable as model_fn(params, batch) -> losses [B]; "
                        f"got {type(model_fn).__name__}")
    read = ((model_fn.__code__, model_fn.__defaults__, model_fn.__dict__.get("__signature__"),
             tuple(model_fn.__kwdefaults__ or ())) if isinstance(model_fn, types.FunctionType) else None)
    if read is not None and (seen := _BINDS.get(model_fn)) is not None and all(
            a is b for a, b in zip(seen[:3], read[:3], strict=True)) and seen[3] == read[3]:
        return  # (by identity: a default may be a tensor; the keyword-only defaults' names, as the dict holds them now)
    try:
        signature = inspect.signature(model_fn, follow_wrapped=False)  # (a decorator's wrapper is what is called)
    except (TypeError, ValueError):  # a builtin or an extension type: told by its own call
        return
    try:
        signature.bind(None, None)
    except TypeError:  # (a bare "missing 1 required positional argument" from inside the trace before)
        raise TypeError(f"{where}: model_fn must be callable as model_fn(params, batch) -> losses [B], two "
                        f"positional arguments (a batch of several tensors is one pytree: unpack it inside); its "
                        f"signature is {getattr(model_fn, '__name__', type(model_fn).__name__)}{signature}") from None
    if read is not None:
        _BINDS[model_fn] = read
