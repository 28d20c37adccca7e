"""Many processes: the ``group=`` contract and the few ``torch.distributed`` collectives it uses.

The contract (for :func:`ghostfunc.graddot`, :func:`ghostfunc.inrun_shapley` and
:func:`ghostfunc.train_step`): on every rank of ``group`` the batches are *that
rank's rows*; the global batch is the concatenation of every rank's rows in rank
order (ranks may hold different numbers of rows), and every rank gets exactly what
one process would give on the global batches, for its own rows. ``group=None`` is
one process and touches nothing here.

What travels, per call (no communication layer of ghostfunc's own: ``torch.distributed``
collectives only):

1. :func:`agree`: one ``all_gather_object`` of a small signature (parameter names,
   shapes and dtypes, a fingerprint of the parameter values (:func:`param_checksum`),
   the batch structure, row counts, options, or the error the rank's own argument
   checks raised; a second one only where a :class:`Deferred` entry differs: a training
   step's optimizer state continued on one rank and not on another). Ranks that disagree, or a rank whose checks failed (zero training
   rows, say), raise the same error on *every* rank, naming the rank and what
   differed, before any tensor collective: no hang.
2. :func:`collectively`: after each stretch of local work that precedes a tensor
   collective (the capture of this rank's rows; at order 2 or with a preconditioner
   also the validation pass, which needs the global train gradient), one
   ``all_reduce`` of a single int32: an error raised on one rank only (a non-finite
   loss in its rows, the model failing on them, running out of memory) raises on
   *every* rank (the failed rank its own error, the others a ``RuntimeError`` naming
   it and its message) instead of leaving them in the next all-reduce until the
   process group's timeout.
3. :func:`allreduce_sum` of the validation direction (``Σ_v w_v g_v``; at order 2
   together with ``H_val G``): one flat buffer per dtype, in buckets of
   :data:`BUCKET_BYTES`, not one call per parameter.
4. :func:`allreduce_sum` of the training gradient (the sum of every rank's rows), the
   same way.

Ghost-routed parameters would need every rank's validation factors; with
``group`` the routing picks the cheaper of contract and materialise against the
all-reduced direction instead (``_graddot.group_policy``), and the plan says so. ``val_reduce=None`` (the full matrix
against every validation row) gathers the validation rows themselves
(:func:`gather_rows`) and scores them on every rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import numbers as numbers_module
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from ._capture import Batch, split_batch
from ._interact import stopped

if dist.is_available():
    # Imported now, before the caller's init_process_group: its functions take ``group=group.WORLD`` as a
    # default, bound when the module is first imported. Imported later (as torch._dynamo's import does, on
    # ghostfunc's first interception), those defaults keep the default process group alive past
    # destroy_process_group until the interpreter's teardown, where gloo's worker threads then abort the
    # process now and then ("terminate called without an active exception", rc -6 under torchrun).
    import torch.distributed.nn  # noqa: F401

#: Largest flat buffer one all-reduce call sends (DDP's default bucket is 25 MiB).
BUCKET_BYTES = 64 * 2**20

T = TypeVar("T")


class World(NamedTuple):
    """What :func:`agree` learnt: this rank, the ranks, and every rank's row counts (rank order)."""

    rank: int
    size: int
    n_train: tuple[int, ...]
    n_val: tuple[int, ...]

    @property
    def n(self) -> int:
        """Training rows of the global batch."""
        return sum(self.n_train)

    @property
    def m(self) -> int:
        """Validation rows of the global batch."""
        return sum(self.n_val)

    @property
    def val_offset(self) -> int:
        """Where this rank's validation rows start in the global validation batch."""
        return sum(self.n_val[: self.rank])


class WeakGroup:
    """A process group held weakly, as an object kept for a whole run holds it (a ``train_step`` in a script's
    globals): held strongly, the group outlived ``destroy_process_group`` into the interpreter's teardown, where
    gloo aborted a rank now and then (``terminate called without an active exception``: 5 of 16 two-rank jobs
    that kept the group so, 0 of 16 that did not)."""

    __slots__ = ("_ref", "_id")

    def __init__(self, group: Any) -> None:
        self._ref, self._id = weakref.ref(group), id(group)

    def __eq__(self, other: object) -> bool:
        """The same group (while it lives; a destroyed one equals only the holder of the same reference)."""
        if not isinstance(other, WeakGroup):
            return NotImplemented
        mine = self._ref()
        return mine is other._ref() if mine is not None else self._ref is other._ref

    def __hash__(self) -> int:
        return hash(self._id)

    def get(self, where: str) -> Any:
        """The group; ``RuntimeError`` once it is gone (destroyed and let go: a step would run as one process)."""
        group = self._ref()
        if group is None:
            raise RuntimeError(f"{where}: the process group this step was made with no longer exists "
                               f"(torch.distributed.destroy_process_group): make the step again with a live group")
        return group

    def __repr__(self) -> str:
        group = self._ref()
        return repr(group) if group is not None else "<a destroyed process group>"


def resolve(group: Any, where: str) -> Any:
    """``group`` itself, or the one a :class:`WeakGroup` holds."""
    return group.get(where) if isinstance(group, WeakGroup) else group


def held_weakly(group: Any) -> Any:
    """A process group as a :class:`WeakGroup`; anything else (``None``, a mistake the caller's check names) as it is."""
    return WeakGroup(group) if dist.is_available() and isinstance(group, dist.ProcessGroup) else group


def check_group(group: Any, where: str) -> None:
    """``group`` must be ``None`` or a process group of an initialised ``torch.distributed``."""
    if group is None:
        return
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{where}: group= needs torch.distributed initialised "
                           f"(torch.distributed.init_process_group, e.g. under torchrun); it is not")
    if type(group) is int and group == dist.GroupMember.NON_GROUP_MEMBER:  # (new_group gives it the ranks it leaves out)
        raise ValueError(f"{where}: this rank ({dist.get_rank()}) is not a member of the process group passed as "
                         f"group= (torch.distributed.new_group returns GroupMember.NON_GROUP_MEMBER to the ranks it "
                         f"leaves out): call {where} with that group on its members only")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{where}: group must be None (one process) or a torch.distributed ProcessGroup "
                        f"(e.g. torch.distributed.group.WORLD); got {type(group).__name__}")


def batch_signature(batch: Any) -> tuple[str, tuple[Any, ...]]:
    """A batch pytree's structure (its mappings' keys in sorted order), every tensor leaf's per-sample shape and
    dtype (no device: ranks differ there) and every other leaf's value (:func:`described`)."""
    from torch.utils import _pytree as pytree

    from ._checks import keys_sorted

    # (mappings as dicts in key order: a tokenizer's BatchEncoding, keys built in another order on one rank, are
    # the same batch, as graddot takes them beside a dict; the rows are each rank's own either way)
    leaves, spec = pytree.tree_flatten(keys_sorted(batch))
    return str(spec), tuple((tuple(x.shape[1:]), str(x.dtype)) if isinstance(x, Tensor) else described(x)
                            for x in leaves)


#: How deep :func:`described` looks into a leaf's attributes and items, and how many entries in all.
DESCRIBE_DEPTH, DESCRIBE_ITEMS = 3, 1024


def described(leaf: Any) -> Any:
    """A non-tensor batch leaf as every process sees it alike, for comparing ranks: numbers and strings by value,
    containers and objects' attributes (their class by name) item by item, tensors and NumPy arrays by shape,
    dtype and a checksum of their contents, modules by their tensors' :func:`param_checksum`. ``repr`` was used
    before: a plain object's names its address (other in each process: equal configs refused), and NumPy elides
    a long array's middle (a difference there passed: 0.12 off one process)."""
    from ._interact import leaf_walk

    return leaf_walk(leaf, DESCRIBE_DEPTH, DESCRIBE_ITEMS, _atom_alike, _class_and_repr)[0]


def _atom_alike(x: Any) -> Any:
    import zlib

    from ._interact import _is_array, tensor_checksum

    kind = type(x)
    if x is None or issubclass(kind, (bool, int, float, complex, str, bytes)):
        return (kind.__name__, repr(x))
    if issubclass(kind, torch.device):  # its type only: each rank holds its own GPU ("cuda:0", "cuda:1")
        return ("device", x.type)
    if issubclass(kind, Tensor):
        crc = tensor_checksum(x)
        if crc is None:  # one torch cannot read as bytes (a nested tensor, a subclass): its kind alone
            return ("tensor", kind.__qualname__, str(x.dtype))
        return ("tensor", tuple(x.shape), str(x.dtype), crc)
    if _is_array(x) and not x.dtype.hasobject:  # (an array of objects: walked item by item)
        return ("array", x.shape, str(x.dtype), zlib.crc32(x.tobytes()))
    if issubclass(kind, torch.nn.Module):
        floats = {k: v for k, v in x.state_dict().items() if v.is_floating_point()}
        return (_class_and_repr(x)[0], tuple(param_checksum(floats).items()) if floats else ())
    return None


def _class_and_repr(x: Any, whole: bool = False) -> tuple[str, str]:
    """An object's class by name and its repr, unless that names the address only (a default repr) or raises,
    or its attributes were walked (``whole``) and are all of its state (a plain class: its repr shows them
    again, with the devices each rank names its own way)."""
    from ._interact import plain_class

    name = f"{type(x).__module__}.{type(x).__qualname__}"
    if whole and plain_class(type(x)):
        return name, ""
    try:
        text = repr(x)
    except Exception:  # noqa: BLE001 - the object's own repr failed: its class alone
        return name, ""
    return name, "" if " at 0x" in text else text


def param_signature(params: Mapping[str, Tensor]) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    return tuple((k, tuple(v.shape), str(v.dtype)) for k, v in params.items())


#: Period of the position weights of :func:`param_checksum`: a prime (so a transpose or a swap of rows moves
#: entries to other weights unless a dimension is 1 more than a multiple of it), below the 32768 elements
#: under which torch reduces a CPU tensor on one thread (its float64 sums below are then the same bits for
#: any thread count).
CHECK_PERIOD = 24571
_CHECK_WEIGHTS: dict[torch.device, Tensor] = {}


def _check_weights(device: torch.device) -> Tensor:
    """``[2, L]`` float64 (``L`` = :data:`CHECK_PERIOD`): ones, and the position weights ``1 + frac(j·φ)``, all
    distinct and not linear in ``j`` (no run of neighbouring changes cancels); made once per device."""
    w = _CHECK_WEIGHTS.get(device)
    if w is None:
        phi = (5**0.5 - 1) / 2
        w = torch.tensor([[1.0] * CHECK_PERIOD, [1.0 + (j * phi) % 1.0 for j in range(CHECK_PERIOD)]],
                         dtype=torch.float64).to(device)
        _CHECK_WEIGHTS[device] = w
    return w


def param_checksum(params: Mapping[str, Tensor]) -> dict[str, tuple[str, str]]:
    """A fingerprint of every parameter's values, name -> two hex floats (``float.hex``; one device sync):
    ranks holding different values differ here; ranks holding bitwise equal ones agree (on one device type).

    Per tensor (flattened: ``x``, ``N = R·L + r`` entries, ``L`` = :data:`CHECK_PERIOD`): its sum and
    ``Σ_i w_(i mod L) x_i`` (:func:`_check_weights`), so a permutation, a transpose or swapped values with
    equal sums are caught too (not a swap of two entries a multiple of ``L`` apart). One pass over the
    tensor's memory, in its dtype and without a temporary of its size: the column sums of
    ``x[:R·L].view(R, L)`` (torch's own reduction over rows: the same bits for any thread count or alignment,
    where a BLAS product's need not be), the ``r`` last entries added to the first ``r`` of those in
    float64, then two sums over ``L`` numbers. A tensor that is not contiguous is copied first.
    """
    out = []
    for v in params.values():
        flat = v.detach().reshape(-1)
        whole = flat.numel() - flat.numel() % CHECK_PERIOD
        if whole:
            cols = flat[:whole].view(-1, CHECK_PERIOD).sum(0).double()  # a new tensor (even from float64)
            cols[: flat.numel() - whole] += flat[whole:]
        else:
            cols = flat.double()
        out.append((cols * _check_weights(flat.device)[:, : cols.numel()]).sum(1))
    hexes = [float.hex(x) for x in torch.cat(out).tolist()] if out else []
    return {k: (hexes[2 * i], hexes[2 * i + 1]) for i, k in enumerate(params)}


def model_state(model_fn: Any, params: Mapping[str, Tensor]) -> dict[str, Any]:
    """What the modules ``model_fn`` reads hold besides the parameters passed in, as every process sees it alike:
    every submodule's class and ``training`` flag, the plain numeric settings of torch's and Hugging Face's
    modules (a norm's ``eps``, a head count; a module of one's own may hold its rank or device), and a
    fingerprint (:func:`param_checksum`) of the frozen tensors (parameters that need no gradient: a frozen base
    under a trained head; buffers in the state dict, not scratch space). Ranks built from other configs, one in
    train mode, or a base initialised from other seeds scored their rows with another model (0.06-0.49 off one
    process) and passed.
    A module tensor named as one of ``params`` (``functional_call`` puts the passed one in its place) is not
    looked at. A tensor's fingerprint is kept while its version counter stands (a frozen base is summed once)."""
    from ._interact import modules_of, named_reads

    described_modules, frozen = [], {}
    for i, root in enumerate(modules_of(model_fn, wide=False)):  # (as far as the ranks compared before)
        for name, m in root.named_modules():
            if type(m).__name__ in _WRAPPERS:  # (a wrapper's settings are per rank: its device ids)
                continue
            origin = type(m).__module__
            known = origin.startswith(_KNOWN_MODULES)  # (a module of one's own may hold its rank or device: its
            settings = tuple((k, float.hex(float(v)) if type(v) is float else v)  # floats only, a temperature)
                             for k, v in vars(m).items()
                             if not k.startswith("_") and (type(v) in _SETTINGS if known else type(v) is float))
            described_modules.append((i, name, f"{origin}.{type(m).__qualname__}", m.training, settings))
            scratch = m._non_persistent_buffers_set  # (a buffer left out of the state dict may be scratch space)
            for k, t in (*m._parameters.items(), *((k, b) for k, b in m._buffers.items() if k not in scratch)):
                path = f"{name}.{k}" if name else k
                if t is not None and not t.requires_grad and t.dtype is not torch.bool and not t.is_complex() and \
                        path not in params:
                    frozen[f"{i}:{path}"] = t
    data: dict[str, Tensor] = {}
    numbers: dict[str, str] = {}  # what model_fn reads besides modules: a class-weight tensor, a temperature

    def see(label: str, v: Any, depth: int) -> None:
        if isinstance(v, Tensor):
            if v.is_floating_point() and v.layout is torch.strided and v.numel() <= READ_TENSOR_ELEMENTS:
                data[label] = v  # (a larger one may be each rank's own table, indexed by its rows' ids)
        elif type(v) is float or type(v).__module__ == "numpy" and isinstance(v, numbers_module.Real) and \
                not isinstance(v, numbers_module.Integral):
            numbers[label] = repr(float(v))  # (exact: the shortest repr reads back as the same float)
        elif _numpy_floats(v):  # (sklearn's class weights of each rank's own shard: 0.25-0.89 off, unrefused, h62)
            numbers[label] = f"{v.dtype} {v.shape} {hashlib.sha256(v.tobytes()).hexdigest()}"
        elif depth and type(v) in (dict, list, tuple):  # (not an object's attributes: a script's args or trainer
            items = v.items() if type(v) is dict else enumerate(v)  # holds per-rank floats the loss never reads,
            for k, x in itertools.islice(items, 64):  # a start time, a running loss: refused)
                see(f"{label}[{k!r}]", x, depth - 1)

    for label, obj in named_reads(model_fn):
        see(label, obj, 2)
    return {"model (modules, modes and settings)": tuple(described_modules),
            "model's frozen tensors (fingerprints)": _kept_checksums(frozen),
            READS_KEY: {**numbers, **_kept_checksums(data)}}


def _numpy_floats(v: Any) -> bool:
    """Whether ``v`` is a NumPy array of real floats of at most :data:`READ_TENSOR_ELEMENTS` (compared as a floating
    tensor is; NumPy is not imported for it)."""
    numpy = sys.modules.get("numpy")
    return numpy is not None and type(v) is numpy.ndarray and v.dtype.kind == "f" and v.size <= READ_TENSOR_ELEMENTS


READS_KEY = "floats and small float tensors model_fn reads (fingerprints)"
#: Floating tensors ``model_fn`` reads up to this many elements are compared across ranks (class weights, a
#: temperature); a larger one may be each rank's own table of its rows' features.
READ_TENSOR_ELEMENTS = 4096


_WRAPPERS = frozenset({"DistributedDataParallel", "FullyShardedDataParallel", "DataParallel"})
_SETTINGS = (bool, int, float)
#: Modules whose plain settings are compared (their meaning is known: a norm's eps, a head count).
_KNOWN_MODULES = ("torch.", "transformers.")
#: a tensor's identity -> (its version counter, its :func:`param_checksum` entry, its :func:`probes`)
#: (:func:`model_state`; emptied
#: past :data:`KEPT_CHECKSUMS` entries).
_CHECKSUMS: dict[Any, tuple[int | None, tuple[str, str], bytes]] = {}
KEPT_CHECKSUMS = 1 << 14


def _kept_checksums(tensors: Mapping[str, Tensor]) -> dict[str, tuple[str, str]]:
    """:func:`param_checksum` of ``tensors``, each summed again only when its version counter or its
    :func:`probes` moved (a write through ``.data`` moves no counter, a tensor made under inference mode keeps none:
    a frozen weight edited so on one rank was scored with another model than the others', 0.54 off)."""
    from ._interact import Identity, version

    keys = {k: Identity(t) for k, t in tensors.items()}
    seen = probes(tensors)
    fresh = {k: t for k, t in tensors.items()
             if (kept := _CHECKSUMS.get(keys[k])) is None or kept[0] != version(t) or kept[2] != seen[k]}
    if len(_CHECKSUMS) + len(fresh) > KEPT_CHECKSUMS:
        _CHECKSUMS.clear()
        fresh = dict(tensors)
    for k, value in param_checksum(fresh).items():
        _CHECKSUMS[keys[k]] = (version(fresh[k]), value, seen[k])
    return {k: _CHECKSUMS[keys[k]][1] for k in tensors}


#: How many entries of a tensor :func:`probes` reads (evenly spaced over it).
PROBE = 64


def probes(tensors: Mapping[str, Tensor]) -> dict[str, bytes]:
    """The bits of :data:`PROBE` evenly spaced entries of each tensor (all of a smaller one), in one device sync:
    what a tensor's identity and version counter do not show, a write through ``.data`` (an update, a fill, a copy
    of another tensor), shows here without a pass over its memory (a write to entries between them does not)."""
    parts: dict[torch.device, list[tuple[str, Tensor]]] = {}
    out = dict.fromkeys(tensors, b"")
    for k, t in tensors.items():
        if t.layout is not torch.strided or t.is_meta or not t.numel():
            continue
        flat = t.detach()
        if flat.is_quantized:  # (viewed as bytes, a quantized tensor crashed the process)
            flat = flat.int_repr()
        if flat.numel() > PROBE:
            picks = torch.arange(0, flat.numel(), flat.numel() // PROBE, device=flat.device)[:PROBE]
            # the same entries of any layout, read where they lie (a transposed 4000x4000 view was copied whole
            # to read them: 50 ms, h54)
            flat = flat.reshape(-1)[picks] if flat.is_contiguous() else flat[torch.unravel_index(picks, flat.shape)]
        flat = flat.resolve_conj().resolve_neg().reshape(-1)  # (a conjugate view is no bytes of its own)
        parts.setdefault(flat.device, []).append((k, flat.contiguous().view(-1).view(torch.uint8)))
    for found in parts.values():
        raw = torch.cat([b for _, b in found]).cpu().numpy().tobytes()
        at = 0
        for k, b in found:
            out[k] = raw[at:at + b.numel()]
            at += b.numel()
    return out


def broadcast_params(params: Mapping[str, Tensor], group: Any) -> dict[str, Tensor]:
    """Rank 0's ``params`` on every rank (as DDP does when it wraps a module): one flat broadcast per dtype."""
    out: dict[str, Tensor] = {}
    src = dist.get_global_rank(group, 0)
    for keys in _buckets(params):
        flat = torch.cat([params[k].detach().reshape(-1) for k in keys])
        dist.broadcast(flat, src=src, group=group)
        for k, part in zip(keys, flat.split([params[k].numel() for k in keys]), strict=True):
            out[k] = part.view(params[k].shape).clone()
    return {k: out[k] for k in params}


class Deferred(NamedTuple):
    """A signature entry for :func:`agree` that is cheap to compare where every rank has it (``cheap``, a
    token such as "this rank's state is the one the last step returned") and costly otherwise: where ranks'
    entries differ and one is deferred, every rank sends ``full()`` (a deferred one) or its entry again and
    they are compared on that."""

    cheap: Any
    full: Callable[[], Any]


def _full(entry: Deferred) -> Any:
    """``entry.full()``, or what it raised as the entry (then the ranks differ there and every rank raises: one
    that raised here alone would leave the others in the gather)."""
    try:
        return entry.full()
    except Exception as err:  # noqa: BLE001 - compared, not raised here
        return ("could not be fingerprinted", f"{type(err).__name__}: {err}")


def agree(where: str, group: Any, prepare: Callable[[], T], signature: Callable[[T], dict[str, Any]],
          rows: Callable[[T], tuple[int, int]]) -> tuple[T, World]:
    """Run this rank's argument checks (``prepare``), then check every rank agrees, in one collective.

    ``signature(prepared)`` is a dict of what must be equal on all ranks
    (``{"param names and shapes": ..., "val_reduce": ...}``); ``rows(prepared)``
    this rank's ``(n_train, n_val)``. An error raised by ``prepare`` is not raised
    at once: it is gathered with the others, and then every rank raises
    ``ValueError`` (of the failed check's type where every failed rank raised one: :func:`_as_kind`) naming each
    failed rank and its message, so no rank is left waiting in a later collective. Returns ``prepare()`` and the
    :class:`World`.
    """
    check_group(group, where)
    prepared: T | None = None
    failure: Exception | None = None
    deferred: dict[str, Any] = {}
    try:
        prepared = prepare()
        deferred = signature(prepared)
        mine: dict[str, Any] = {"signature": {k: v.cheap if isinstance(v, Deferred) else v
                                              for k, v in deferred.items()},
                                "rows": rows(prepared), "error": None, "where": where, "deferred": sorted(
                                    k for k, v in deferred.items() if isinstance(v, Deferred))}
    except Exception as err:  # reported on every rank below
        failure = stopped(err) or err  # (a StopIteration, not what a generator of ours made of it)
        mine = {"signature": None, "rows": (0, 0), "error": f"{type(failure).__name__}: {failure}", "where": where,
                "deferred": [], "kind": _kind(failure)}
    rank, size = rank_and_size(group)
    every: list[Any] = [None] * size
    dist.all_gather_object(every, mine, group=group)
    refuse_other_calls(where, [e.get("where") if isinstance(e, dict) else None for e in every])
    errors = [f"rank {r}: {e['error']}" for r, e in enumerate(every) if e["error"] is not None]
    if errors:
        few = any("val is empty" in e for e in errors) and len(errors) < size
        kind = _as_kind([e["kind"] for e in every if e["error"] is not None], ValueError)
        reduce = " with val_reduce='mean'" if where == "graddot" else ""  # (train_step, inrun_shapley: a mean always)
        hint = (f" (a validation set smaller than the number of processes: pass all of it on every rank{reduce}, "
                f"whose mean over the ranks' rows is then the set's own)" if few else "")
        try:
            _raise_as(kind, ValueError, f"{where}: the arguments failed their checks on {len(errors)} of {size} ranks; "
                      + "; ".join(errors) + hint, failure)
        finally:  # this frame, which its traceback holds, must not hold it: a cycle kept the process group alive
            del failure  # into interpreter teardown, where gloo aborted ("terminate called ...")
    ref = every[0]["signature"]
    for r, e in enumerate(every[1:], start=1):
        if e["signature"].keys() != ref.keys():
            raise ValueError(f"{where}: every rank must pass the same options; rank {r} has "
                             f"{sorted(e['signature'])}, rank 0 has {sorted(ref)}")
    again = sorted({k for e in every for k in e["deferred"]} & {k for k in ref if any(
        e["signature"][k] != ref[k] for e in every[1:])})
    if again:  # (every rank sees the same gathered entries: all of them take this second round, or none)
        full = {k: _full(v) if isinstance(v := deferred[k], Deferred) else v for k in again}
        fulls: list[Any] = [None] * size
        dist.all_gather_object(fulls, full, group=group)
        for e, f in zip(every, fulls, strict=True):
            e["signature"].update(f)
    for r, e in enumerate(every[1:], start=1):
        for key in ref:
            if e["signature"][key] != ref[key]:
                raise ValueError(f"{where}: every rank must pass the same {key}; "
                                 + _difference(e["signature"][key], ref[key], r) + _hint(key, e, every[0]))
    empty = [r for r, e in enumerate(every) if e["rows"][0] == 0]
    if empty:
        raise ValueError(f"{where}: every rank needs at least one training row; rank(s) {empty} have none")
    assert prepared is not None
    return prepared, World(rank, size, tuple(e["rows"][0] for e in every), tuple(e["rows"][1] for e in every))


@contextlib.contextmanager
def collectively(where: str, group: Any) -> Iterator[None]:
    """This rank's local work before a collective, in a ``with`` block: an error raised in it on any rank of
    ``group`` raises on every rank, so none is left waiting in the next collective until the timeout.

    After the block, one status exchange: an ``all_reduce`` (MAX) of a single int32, this rank failed or not.
    That is the whole cost when nothing fails: one 4-byte all-reduce per block, i.e. its latency (measured
    0.1-0.3 ms on gloo, 2 ranks on a 2-core CPU, ``tests/test_distributed.py`` prints it; on NCCL also one
    device sync for the flag). Only if some rank failed, an ``all_gather_object`` of the messages; then a
    failed rank raises its own error and every other rank a ``RuntimeError`` naming the failed ranks and
    their messages, which is also of the failed ranks' error type where they raised one (:func:`_as_kind`).
    Every rank must enter the same blocks in the same order (as it does the collectives between them); the group can be used again after such an error. ``group=None`` (one process): nothing
    is added. Only :class:`Exception` is exchanged (an interrupt leaves at once).

    The blocks hold the work that runs the model or materialises per-row gradients (where errors depend on a
    rank's rows or memory); the contractions against the reduced direction between the two all-reduces of
    ``_graddot.score_group`` are not in one (no model code; a second exchange per call would double the cost).
    """
    if group is None:
        yield
        return
    try:
        yield
    except Exception as err:
        _exchange_status(where, group, stopped(err) or err)  # (a StopIteration, not what a generator made of it)
        raise
    _exchange_status(where, group, None)


def _kind(err: BaseException) -> tuple[str, str]:
    """``err``'s type as ``(module, qualified name)``, for the other ranks (:func:`_as_kind`)."""
    return type(err).__module__, type(err).__qualname__


def _as_kind(kinds: Sequence[tuple[str, str]], base: type[Exception]) -> type[Exception]:
    """The exception type a failure raises on every rank: ``base`` and, where every failed rank raised one type (of
    a module this process imported too: builtins, torch, ghostfunc, the script's own), that type too (a subclass of
    both where it is not already a ``base``), so an ``except`` clause for the failing rank's error (``except
    SamplesInteractError``) catches it on every rank and the ranks stay in step (rank 0 raised ``RuntimeError``,
    rank 1 ``SamplesInteractError``)."""
    if len(set(kinds)) != 1:
        return base
    module, name = kinds[0]
    kind: Any = sys.modules.get(module)  # (imported already: ranks run the same program; nothing imported here)
    for part in name.split("."):
        kind = getattr(kind, part, None)
    if not (isinstance(kind, type) and issubclass(kind, Exception)):
        return base
    if issubclass(kind, base):
        return kind
    return _mixed(kind, base)


def _mixed(kind: type[Exception], base: type[Exception]) -> type[Exception]:
    """A subclass of ``kind`` and ``base``, named as ``kind`` (made once; ``base`` where they cannot be mixed)."""
    key = (kind, base)
    if key not in _MIXED:
        def reduce(err: BaseException) -> tuple:  # pickled by its parts: the class is made at run time
            return _remade, (kind, base, err.args)

        try:
            _MIXED[key] = type(kind.__name__, (kind, base), {"__module__": kind.__module__, "__reduce__": reduce,
                                                             "__doc__": f"{kind.__name__} raised on another rank "
                                                                        f"(also a {base.__name__}: ghostfunc._dist)"})
        except TypeError:  # (incompatible layouts)
            _MIXED[key] = base
    return _MIXED[key]


def _remade(kind: type[Exception], base: type[Exception], args: tuple) -> BaseException:
    return _mixed(kind, base)(*args)


_MIXED: dict[tuple[type, type], type[Exception]] = {}


def _raise_as(kind: type[Exception], base: type[Exception], message: str, cause: BaseException | None) -> None:
    """Raise ``kind(message)`` (``base(message)`` where ``kind`` cannot be made from a message alone)."""
    try:
        err = kind(message)
        if err.args != (message,):
            raise TypeError
    except Exception:  # noqa: BLE001 - a type whose constructor takes other arguments
        err = base(message)
    try:
        raise err from cause
    finally:  # this frame, which the error's traceback holds, must not hold the error: the cycle kept the group alive
        del err, cause  # until a collection, into the interpreter's teardown, where gloo aborted (3-5 of 8 two-rank
        # jobs that caught a refusal and destroyed the group, h56)


def _exchange_status(where: str, group: Any, failure: Exception | None) -> None:
    """See :func:`collectively`: returns when no rank failed, or when this one did (it raises its own error)."""
    flag = torch.tensor([0 if failure is None else 1], dtype=torch.int32, device=_status_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if not int(flag.item()):
        return
    rank, size = rank_and_size(group)
    every: list[Any] = [None] * size
    mine = None if failure is None else (f"{type(failure).__name__}: {failure}"[:2000], _kind(failure))
    dist.all_gather_object(every, mine, group=group)
    if failure is not None:
        return
    failed = {r: got[0] for r, got in enumerate(every) if got is not None}
    which = f"rank {next(iter(failed))}" if len(failed) == 1 else f"ranks {', '.join(map(str, failed))}"
    what = (next(iter(failed.values())) if len(failed) == 1
            else "; ".join(f"rank {r}: {m}" for r, m in failed.items()))
    kind = _as_kind([got[1] for got in every if got is not None], RuntimeError)
    _raise_as(kind, RuntimeError, f"{where}: {which} of {size} failed, so every rank raises (this is rank {rank}): "
                                  f"{what}", None)


def _status_device(group: Any) -> torch.device:
    """Where the status flag lives: the CPU where the backend takes CPU tensors (gloo, also
    ``"cpu:gloo,cuda:nccl"``), else the backend's device (NCCL: the current CUDA device)."""
    devices = dist.Backend.backend_capability.get(str(dist.get_backend(group)).lower(), ["cpu"])
    if "cpu" in devices:
        return torch.device("cpu")
    if devices[0] == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(devices[0])


def refuse_other_calls(where: str, calls: Sequence[str | None]) -> None:
    """Raise where the ranks' gathered ``calls`` (each one's ``where``; ``None``: another collective's payload) are
    not all ``where``: ranks that make different calls at one point (a KeyError or a TypeError on another
    collective's payload before)."""
    if any(c != where for c in calls):
        raise ValueError(f"{where}: every rank must make the same call at this point; the ranks called "
                         + ", ".join(f"rank {r}: {c or 'another collective'}" for r, c in enumerate(calls))
                         + " (ranks meet in the same collectives, in the same order)")


def _difference(theirs: Any, ours: Any, r: int) -> str:
    """What rank ``r`` has (``theirs``) against rank 0 (``ours``), narrowed to the entries that differ: a dict's
    keys whose values differ, or a sequence's entries that the other lacks; and whether only the order differs."""
    def reordered() -> str:
        return (f"rank {r} has {_short(list(theirs))}, rank 0 has {_short(list(ours))} (the same entries in "
                f"another order: build the dict in the same order on every rank)")

    if isinstance(theirs, dict) and isinstance(ours, dict):
        if sorted(map(repr, theirs.items())) == sorted(map(repr, ours.items())):
            return reordered()
        if theirs.keys() == ours.keys():
            differ = [k for k in theirs if theirs[k] != ours[k]]
            theirs, ours = {k: theirs[k] for k in differ}, {k: ours[k] for k in differ}
    elif isinstance(theirs, (list, tuple)) and isinstance(ours, (list, tuple)) and len(theirs) > 1:
        if sorted(map(repr, theirs)) == sorted(map(repr, ours)):
            return reordered()
        only_theirs, only_ours = [x for x in theirs if x not in ours], [x for x in ours if x not in theirs]
        if only_theirs or only_ours:
            return f"rank {r} has {_short(only_theirs)} where rank 0 has {_short(only_ours)}"
    return f"rank {r} has {_short(theirs)}, rank 0 has {_short(ours)}"


def _hint(key: str, theirs: dict[str, Any], ours: dict[str, Any]) -> str:
    """How to mend a batch structure that differs across ranks only in its tensors' shapes (padding), or a value
    ``model_fn`` reads that differs."""
    if key == READS_KEY:
        return (" (each rank's loss must be the same function: a setting or table built from each rank's own "
                "shard is another model on each; a value that is each rank's own by design, its rows' data, goes "
                "in the batch)")
    if not key.endswith("batch structure"):
        return ""
    a, b = theirs["signature"][key], ours["signature"][key]
    if a[0] == b[0] and len(a[1]) == len(b[1]) and any(
            isinstance(x, tuple) and isinstance(y, tuple) and len(x) == len(y) == 2 and x[1] == y[1] and x[0] != y[0]
            for x, y in zip(a[1], b[1], strict=True)):
        return (" (the tensors' shapes past the sample axis differ: the ranks' batches, concatenated, are the global "
                "batch, so pad every rank's to one length, e.g. padding='max_length' or a collator's "
                "pad_to_multiple_of)")
    return ""


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def allreduce_sum(tensors: Mapping[str, Tensor], group: Any) -> dict[str, Tensor]:
    """``Σ_ranks tensors[k]`` for every ``k``, identical on every rank; inputs untouched.

    The tensors are packed into flat buffers (one per dtype and device, each at
    most :data:`BUCKET_BYTES`) and every buffer is summed by one
    ``torch.distributed.all_reduce``: DDP's bucketing, without its overlap.
    """
    out: dict[str, Tensor] = {}
    for keys in _buckets(tensors):
        flat = torch.cat([tensors[k].reshape(-1) for k in keys])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for k, part in zip(keys, flat.split([tensors[k].numel() for k in keys]), strict=True):
            out[k] = part.view(tensors[k].shape)
    return {k: out[k] for k in tensors}


def allreduce_bytes(tensors: Mapping[str, Tensor]) -> int:
    """What :func:`allreduce_sum` hands to ``all_reduce`` for ``tensors`` (the buffers' bytes)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _buckets(tensors: Mapping[str, Tensor]) -> list[list[str]]:
    groups: dict[tuple[torch.dtype, torch.device], list[list[str]]] = {}
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}
    for k, t in tensors.items():
        key = (t.dtype, t.device)
        nbytes = t.numel() * t.element_size()
        if key not in groups or sizes[key] + nbytes > BUCKET_BYTES:
            groups.setdefault(key, []).append([])
            sizes[key] = 0
        groups[key][-1].append(k)
        sizes[key] += nbytes
    return [keys for per in groups.values() for keys in per if keys]


#: The key of the used-parameter flags in :func:`global_mean`'s all-reduce (no parameter name has a NUL).
_USED = "\0used"


def global_mean(local_mean: Mapping[str, Tensor], world: World, group: Any,
                unused: frozenset[str] = frozenset()) -> tuple[dict[str, Tensor], frozenset[str]]:
    """The mean over every rank's rows from each rank's mean over its own, and the parameters that are
    ``unused`` (:func:`ghostfunc._graddot.unused`: no training row reaches them) on every rank: one all-reduce,
    the flags (one number per parameter) riding in it. A step leaves those as one process would."""
    n_local = world.n_train[world.rank]
    first = next(iter(local_mean.values()))
    used = torch.tensor([0.0 if k in unused else 1.0 for k in local_mean], dtype=first.dtype, device=first.device)
    total = allreduce_sum({**{k: g * n_local for k, g in local_mean.items()}, _USED: used}, group)
    flags = total.pop(_USED).tolist()
    return ({k: g / world.n for k, g in total.items()},
            frozenset(k for k, f in zip(local_mean, flags, strict=True) if f == 0))


def gather_batch(batch: Batch, world: World, group: Any) -> Batch:
    """The global validation batch: every rank's rows of ``batch``, in rank order (:func:`gather_rows`)."""
    return split_batch(batch.rebuild(gather_rows(batch.tensors, world, group)))


def gather_rows(tensors: Sequence[Tensor], world: World, group: Any) -> list[Tensor]:
    """Every rank's rows of each tensor, concatenated in rank order (``[Σ_r m_r, ...]``).

    Row counts may differ between ranks (``world.n_val``): each tensor is padded to
    the largest count, gathered with ``all_gather``, and trimmed.
    """
    counts, top = world.n_val, max(world.n_val)
    out = []
    for t in tensors:
        padded = t.new_zeros((top, *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(world.size)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        out.append(torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]))
    return out


def rank_and_size(group: Any) -> tuple[int, int]:
    """``(rank, world size)`` in ``group``; ``(0, 1)`` for ``None`` (one process)."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def sampler_mask(sampler: Any) -> Tensor:
    """``[len(sampler)]`` bool, in the order ``sampler`` yields its indices: False for the padding repeats.

    ``torch.utils.data.DistributedSampler`` with ``drop_last=False`` pads the
    dataset's (shuffled) index list with its own first entries up to a multiple of
    the number of ranks, then gives rank ``r`` the entries ``r, r + W, r + 2W, ...``;
    entry ``i`` of rank ``r`` is padding iff ``r + i·W ≥ len(dataset)``. Pass the
    batch's slice as ``keep`` to :meth:`ghostfunc.DataValues.add` so those repeats
    are valued and counted once (their first time), as in one process over the
    dataset. (The training step still sees them, as DDP does.)
    """
    where = "sampler_mask"
    needed = ("num_replicas", "rank", "num_samples", "drop_last", "dataset")
    if not all(hasattr(sampler, a) for a in needed):
        raise TypeError(f"{where}: sampler must be a torch.utils.data.DistributedSampler (or have its attributes "
                        f"{needed}); got {type(sampler).__name__}")
    i = torch.arange(sampler.num_samples)
    if sampler.drop_last:
        return torch.ones(sampler.num_samples, dtype=torch.bool)
    return sampler.rank + i * sampler.num_replicas < len(sampler.dataset)


def unwrap(model: torch.nn.Module, where: str) -> torch.nn.Module:
    """``model.module`` for a ``DistributedDataParallel`` wrapper; an error for FSDP-sharded models.

    DDP keeps a full replica of the parameters on every rank, so its ``.module`` is
    exact. FSDP (``FullyShardedDataParallel``) and FSDP2 (``fully_shard``, DTensor
    parameters) keep a shard: ``torch.func`` through such a module sees the
    all-gathered copies FSDP's hooks install, not the parameters it was given, and
    returns zero gradients without an error. So they are refused with what to pass.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    sharded: list[str] = []
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        sharded = [name or "<root>" for name, m in model.named_modules()
                   if isinstance(m, (FSDPModule, FullyShardedDataParallel))]
    except ImportError:  # pragma: no cover - torch built without distributed
        pass
    try:
        from torch.distributed.tensor import DTensor

        sharded += [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
    except ImportError:  # pragma: no cover
        pass
    if sharded:
        raise TypeError(
            f"{where}: the model is sharded by FSDP ({', '.join(sharded[:4])}{', ...' if len(sharded) > 4 else ''}); "
            "ghostfunc needs every parameter whole on every rank (torch.func through an FSDP module would see "
            "FSDP's gathered copies and give zero gradients). Pass an unsharded replica instead: the model before "
            "fully_shard / FullyShardedDataParallel, or a copy loaded with torch.distributed.checkpoint.state_dict."
            "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)); then use group= for "
            "data parallelism (DDP-style)")
    return model
