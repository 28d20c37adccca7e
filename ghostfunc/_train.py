"""A stateless training step that also returns In-Run Data Shapley values.

``step = train_step(model_fn, optimizer, order=1)``; ``state = step.init(params)``;
``state, info = step(state, train, val)``. One pass over each batch gives the
per-sample values and the mean *training* gradient; the optimizer update uses
that gradient only, so the parameters follow an ordinary ``torch.optim`` loop over
the training batches (the validation rows never move the model).
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from . import _dist
from ._checks import check_compile, check_params
from ._interact import grads_on
from ._optim import Optimizer, one_element
from ._secant import Scratch, ValGrad, check_curvature, versions
from ._shapley import ORDERS, compute_values

Params = dict[str, Tensor]


class TrainState(NamedTuple):
    """Everything a step needs: ``params`` (name -> tensor), ``opt_state``, and ``step`` (updates done).

    ``step`` counts this run's updates; the optimizer's own ``opt_state.step`` is what its learning-rate schedule
    and bias corrections follow: an optimizer state made afresh mid-run (``state._replace(opt_state=opt.init(
    params))``, as a new ``torch.optim`` optimizer) starts its schedule again while ``step`` counts on.

    ``val_grad`` (``curvature="secant"`` only): the mean validation gradient at
    ``params`` that the previous step computed for its validation batch; the next
    step reuses it when its validation batch is equal, else it is recomputed.
    """

    params: Params
    opt_state: Any
    step: int
    val_grad: ValGrad | None = None

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled (``torch.save``) without ``val_grad``: a cache of the function it is the gradient of (a local
        function or the weak references of its fingerprint did not pickle); a step after loading takes it again."""
        return TrainState, (self.params, self.opt_state, self.step)

    def __copy__(self) -> TrainState:
        return TrainState(*self)

    def __deepcopy__(self, memo: dict[int, Any]) -> TrainState:
        """A copy with its cache (``copy.deepcopy`` keeps ``val_grad``; only pickling leaves it out)."""
        return TrainState(copy.deepcopy(self.params, memo), copy.deepcopy(self.opt_state, memo), self.step,
                          copy.deepcopy(self.val_grad, memo))


class StepInfo(NamedTuple):
    """What one step reports.

    Attributes:
        values: ``[n_train]`` In-Run Data Shapley values ``φ`` of this step at the
            configured order (negative = the sample lowered the validation loss).
        first_order: ``[n_train]`` the order-1 values (``values`` itself when ``order=1``, preconditioned with
            ``precondition=True``).
        train_loss: ``[n_train]`` per-sample losses before the update.
        val_loss: ``[n_val]`` per-sample losses before the update.
        lr: the learning rate ``η`` of this step.
        notes: the notes of the step's plan (as ``graddot(...).plan.notes``): e.g. that the
            training rows' dropout masks are not the ones a plain ``model_fn(params, train)``
            draws, so this step is exact for its own masks and not ``torch.optim``'s step.
    """

    values: Tensor
    first_order: Tensor
    train_loss: Tensor
    val_loss: Tensor
    lr: float
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainStep:
    """A pure training step; build it with :func:`train_step`.

    ``init(params) -> TrainState``; ``step(state, train, val) -> (TrainState, StepInfo)``.
    ``_scratch``: memory for the training rows' materialised gradients (order 2, and order 1 with
    ``precondition``), reused from step to step; no result refers to it, so the step stays pure.
    """

    model_fn: Callable[[Params, Any], Tensor]
    optimizer: Optimizer
    order: int = 1
    precondition: bool = False
    group: Any = None
    curvature: str = "exact"
    compile: bool = False
    _scratch: Scratch = field(default_factory=dict, init=False, repr=False, compare=False)
    #: the optimizer state this step last returned, as :func:`_handed_out` records it (with ``group``)
    _returned: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def _held(self) -> tuple:
        """The compared fields as the step holds them (its group as a :class:`ghostfunc._dist.WeakGroup`): what
        ``==``, ``hash`` and ``repr`` read, so that they work on a step whose group was destroyed (logging, a
        traceback's locals)."""
        return tuple(self.__dict__[f.name] for f in fields(self) if f.compare)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._held() == other._held()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._held())

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={self.__dict__[f.name]!r}" for f in fields(self) if f.repr)
        return f"{type(self).__name__}({shown})"

    def __post_init__(self) -> None:
        """The checks of :func:`train_step`, here so that a step built as ``TrainStep(...)`` gets them too."""
        where, order, precondition, compile = "train_step", self.order, self.precondition, self.compile
        if not callable(self.model_fn):
            raise TypeError(f"{where}: model_fn must be callable as model_fn(params, batch) -> losses [B]; "
                            f"got {type(self.model_fn).__name__}")
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(f"{where}: optimizer must be a ghostfunc.Optimizer (ghostfunc.sgd(...), "
                            f"ghostfunc.adamw(...)); got {type(self.optimizer).__name__}")
        if type(order) is not int or order not in ORDERS:  # not 2.0 or True (== 1)
            raise ValueError(f"{where}: order must be 1 or 2; got {order!r}")
        if not isinstance(precondition, bool):
            raise TypeError(f"{where}: precondition must be True or False; got {precondition!r}")
        if precondition and order != 1:
            raise ValueError(f"{where}: precondition=True gives first-order values only; got order={order}")
        if precondition and not callable(self.optimizer.precondition):
            raise TypeError(f"{where}: precondition=True needs the optimizer's precondition(direction, grads, state); "
                            f"{self.optimizer.name}'s is {self.optimizer.precondition!r}")
        _dist.check_group(self.group, where)
        check_curvature(where, self.curvature, order)
        check_compile(where, compile, "mean", None)  # with a group: refused in init and in every step, on every rank
        if compile and (order != 1 or precondition):
            raise ValueError(f"{where}: compile=True computes first-order values without precondition; got "
                             f"order={order}, precondition={precondition}")

    @grads_on  # (under torch.inference_mode() the state's tensors would be inference tensors, refused next step)
    def init(self, params: Mapping[str, Tensor]) -> TrainState:
        """The state before the first step: detached copies of ``params`` and a fresh optimizer state.

        With ``group``: a collective; every rank gets rank 0's ``params`` (as DDP does).
        """
        def checked() -> Params:
            if not isinstance(params, (Mapping, torch.nn.ParameterDict)) or not params:
                raise TypeError(f"train_step.init: params must be a non-empty dict name -> tensor; "
                                f"got {type(params).__name__}")
            one_process_only("train_step", group, self.curvature, self.compile)
            return {k: v.clone() for k, v in check_params(params, "train_step.init").items()}

        group = self.group
        if group is None:
            own = checked()
        else:  # every rank starts from rank 0's parameters, as under DDP; a rank's failed check raises on every rank
            own, _ = _dist.agree("train_step.init", group, checked,  # before the broadcast reads them
                                 lambda p: {"parameter names, shapes and dtypes": _dist.param_signature(p)},
                                 lambda p: (1, 1))
            own = _dist.broadcast_params(own, group)
        return TrainState(own, self.optimizer.init(own), 0)

    @grads_on
    def __call__(self, state: TrainState, train: Any, val: Any) -> tuple[TrainState, StepInfo]:
        """One update on the training rows, with the values of every training row.

        Args:
            state: from :meth:`init` or the previous step; not modified.
            train: batch pytree, sample axis first (``n`` rows). Leaves the model
                ignores (a dataset ``index``, say) ride along untouched.
            val: batch pytree with the same structure (``m`` rows); it is scored
                against, never trained on.

        Returns:
            ``(new_state, info)``; see :class:`StepInfo`.
        """
        where, opt = "train_step", self.optimizer
        group = self.group
        if not isinstance(state, TrainState):
            raise TypeError(f"{where}: state must be the TrainState from step.init(params); got {type(state).__name__}")
        said = f"{where}: state.step must be an int >= 0 (the updates done); got {state.step!r}"
        if isinstance(state.step, bool) or not isinstance(state.step, numbers.Integral):
            raise TypeError(f"{said} (a {type(state.step).__name__})")
        if state.step < 0:
            raise ValueError(said)
        # a state built by hand may hold tensors that require grad (nn.Parameters): the step reads them detached,
        # else its new state would carry a graph back through every earlier step (memory growing over a run)
        if group is None:
            if not isinstance(state.params, Mapping) or not state.params:
                raise TypeError(f"{where}: state.params must be a non-empty dict name -> tensor (as step.init makes "
                                f"it); got {type(state.params).__name__}")
            own = check_params(state.params, where)
            if opt.check_state is not None:  # before the passes, not by the update after them
                opt.check_state(state.opt_state, own, where)
        else:  # the ranks' agreement checks the params (a rank that alone raised here would leave the others waiting)
            own = ({k: v.detach() if isinstance(v, Tensor) else v for k, v in state.params.items()}
                   if isinstance(state.params, Mapping) else state.params)
        lr = opt.lr(state.opt_state)
        if one_element(lr):
            lr = lr.item()  # (a hand-written optimizer's lr(state) as a tensor: StepInfo.lr is a number)
        pre = None
        if self.precondition:
            def pre(direction: Params, grads: Params) -> Params:
                return opt.precondition(direction, grads, state.opt_state)
        try:
            out = compute_values(where, self.model_fn, own, train, val, lr=lr, order=self.order,
                                 precondition=pre, group=group, curvature=self.curvature,
                                 val_grad=state.val_grad, compile=self.compile, scratch=self._scratch,
                                 optimizer=(opt.name, *opt.settings),
                                 optimizer_state=() if group is None else
                                 _optimizer_state_print(state, self._returned.get("state") == _handed_out(state)))
        except KeyError as err:  # nothing else records which parameters the state should hold (a fresh SGD state)
            key = err.args[0] if err.args else None
            if isinstance(key, str) and isinstance(own, Mapping) and key not in own:
                err.add_note(f"{where}: state.params has no {key!r} (it holds {sorted(own)}): if model_fn looked it "
                             f"up there, the state is not one that step.init made for this model's parameters")
            raise
        if group is not None and opt.check_state is not None:  # the params passed the ranks' agreement
            opt.check_state(state.opt_state, own, where)
        # a parameter no training sample reaches is left as torch.optim leaves one whose .grad is None
        grads = {k: None if k in out.unused else g for k, g in out.train_grad.items()}
        with torch.no_grad():  # nothing differentiates a step's update (ghostfunc.unroll replays it on its own)
            params, opt_state = opt.update(grads, state.opt_state, own)
        # what the update passed through as it came (a parameter no gradient reached, its buffers) is detached too
        opt_state = pytree.tree_map_only(Tensor, lambda t: t.detach() if t.requires_grad else t, opt_state)
        assert out.first_order is not None
        info = StepInfo(out.values, out.first_order, out.train_loss, out.val_loss, lr, tuple(out.plan.notes))
        new = TrainState(params, opt_state, state.step + 1, _carried(out.val_grad, params))
        if group is not None:
            self._returned["state"] = _handed_out(new)
        return new, info


def _optimizer_state_print(state: TrainState, continued: bool) -> Any:
    """The step count and a fingerprint of the optimizer's state (moments, momentum buffers, counts), for ranks
    to compare: AdamW second moments changed on one rank gave that rank's preconditioned values and split the
    parameters for a step before anything said so. A state this step returned last, untouched since
    (``continued``), is the same on every rank as the one before it was: its step count alone (the fingerprint
    is two passes over the moments' memory, 10% of a small GPT-2's step), fingerprinted after all where
    another rank's state is not the one it was handed (:class:`ghostfunc._dist.Deferred`: a state one rank
    alone copied or reloaded was refused)."""
    if continued:  # (compared as such where every rank continues; fingerprinted where one does not)
        return _dist.Deferred((state.step, "continued"), lambda: _optimizer_state_print(state, False))
    leaves, spec = pytree.tree_flatten(state.opt_state)
    tensors = {str(i): x for i, x in enumerate(leaves) if isinstance(x, Tensor)}
    return (state.step, str(spec), tuple(x for x in leaves if not isinstance(x, Tensor)),
            tuple(_dist.param_checksum(tensors).items()))


def _get_group(step: TrainStep) -> Any:
    return _dist.resolve(step.__dict__.get("group"), "train_step")


def _set_group(step: TrainStep, group: Any) -> None:
    step.__dict__["group"] = _dist.held_weakly(group)


#: ``step.group`` is the process group, held weakly (:class:`ghostfunc._dist.WeakGroup`): a step kept in a script's
#: globals held it past ``destroy_process_group``, and gloo aborted a rank at exit now and then. (A property on the
#: class is found before the instance's own entry, which it keeps; the frozen dataclass's ``__init__`` sets it
#: through the setter, and ``dataclasses.replace`` reads the group itself; ``==``, ``hash`` and ``repr`` read what
#: the step holds: ``TrainStep._held``.)
TrainStep.group = property(_get_group, _set_group)  # type: ignore[assignment,method-assign]


def _handed_out(state: TrainState) -> tuple:
    """A state's step count and its optimizer state's leaves, tensors by identity, version counter and
    :func:`ghostfunc._dist.probes` (a write through ``.data`` moves no counter: AdamW moments edited so on one rank
    split the ranks' parameters, 0.86 off): equal for the state a step returned as long as nothing was put in or
    written into it."""
    from ._interact import Identity, version

    leaves = pytree.tree_leaves(state.opt_state)
    tensors = {str(i): t for i, t in enumerate(leaves) if isinstance(t, Tensor)}
    seen = _dist.probes(tensors)
    return (state.step, tuple((Identity(t), version(t), seen[str(i)]) if isinstance(t, Tensor) else t
                              for i, t in enumerate(leaves)))


def one_process_only(where: str, group: Any, curvature: str, compile: bool) -> None:
    """Refuse what runs in one process only, under ``group``. Checked inside the ranks' agreement (``init``, every
    step), not where the step is built: a rank that alone asked for it would raise there, and the others would
    wait for it in their first collective."""
    if group is not None and curvature == "secant":
        raise ValueError(f"{where}: curvature='secant' is one process only for now; use curvature='exact' with group=")
    check_compile(where, compile, "mean", group)


def _carried(after: ValGrad | None, params: Params) -> ValGrad | None:
    """The secant's ``ḡ_val(θ')`` when the update landed exactly on ``θ' = θ − lr·ḡ_train`` (plain SGD,
    and the first update of momentum SGD); ``None`` otherwise (momentum, weight decay, AdamW), so the
    next step computes ``ḡ_val`` at its own parameters."""
    if after is None or not all(torch.equal(params[k], after.params[k]) for k in params):
        return None
    # the next state's own tensors: matched by identity and version counter (a write in place since misses), held
    # in a dict of its own (the state's dict is the user's: a tensor put in it later must not change the record)
    return after._replace(params=dict(params), versions=versions(params), checksum=_dist.param_checksum(params))


def train_step(model_fn: Callable[[Params, Any], Tensor], optimizer: Optimizer, *, order: int = 1,
               precondition: bool = False, group: Any = None, curvature: str = "exact",
               compile: bool = False) -> TrainStep:
    """Build a stateless training step that returns In-Run Data Shapley values.

    ``step = train_step(model_fn, optimizer, order=1)``, ``state = step.init(params)``,
    ``state, info = step(state, train, val)``. Per step: ``order=1`` makes the
    passes of :func:`ghostfunc.graddot` (one ordinary backward over the validation
    batch, one tap capture over the training rows, one contraction); ``order=2``
    captures the training rows, then runs one forward-over-reverse pass over the
    validation batch (``ḡ_val`` and the Hessian-vector product together) and one
    pass over the training rows' gradients that dots them with both directions (the value
    and ``info.first_order``). Then ``optimizer.update`` with the
    mean gradient of the **training rows only**, so the trajectory equals a ``torch.optim`` loop on
    the training batches. That mean is the batch gradient unless samples interact in the backward
    (a hook normalising over the batch, ``scale_grad_by_freq``): such a model is refused on the
    first step of each batch signature (:func:`ghostfunc._interact.check_batch_gradient`).

    Values (``info.values``, ``[n_train]``) are ``φ`` of :func:`ghostfunc.inrun_shapley`
    with ``lr`` the optimizer's learning rate for this step: the share of the
    validation-loss change of an SGD step with the mean update (negative = helpful).
    They use the loss gradient only (no weight decay, no momentum).

    With ``precondition=True`` (first order only) they are **optimizer-aware**:
    ``φ_i = −(η/n)·<g_i, P ḡ_val>`` with ``P`` the diagonal preconditioner that
    this step's update applies (``1 / (√v̂ₜ + ε)`` for AdamW, with ``v̂ₜ`` including
    this step's gradient; the identity for SGD), i.e. the first-order effect on the
    validation loss of a preconditioned step along ``g_i`` alone. Momentum and
    Adam's ``1/(1 − β1ᵗ)`` factor are not modelled. It costs nothing extra.

    Args:
        model_fn: ``model_fn(params, batch) -> losses`` ``[B]``.
        optimizer: an :class:`ghostfunc.Optimizer` (:func:`ghostfunc.sgd`, :func:`ghostfunc.adamw`).
        order: 1 or 2.
        precondition: optimizer-aware first-order values.
        group: ``None`` (one process) or a ``torch.distributed`` process group:
            each rank calls the step with its own rows (the global batch is every
            rank's rows in rank order); the update uses the all-reduced mean
            gradient, so parameters and optimizer state stay identical on every
            rank (``precondition=True`` uses the global second moment), and
            ``info`` holds this rank's rows.
        curvature: ``order=2`` only. ``"exact"`` (default): the Hessian-vector product
            above. ``"secant"``: ``φ_i = −(a/2)·<g_i, ḡ_val(θ) + ḡ_val(θ − a·G)>``
            (:func:`ghostfunc.inrun_shapley`), one capture of the training rows and
            ordinary validation backward passes: at ``θ − a·G`` every step, and at ``θ``
            only when the state's ``val_grad`` does not match (a new validation batch,
            or an optimizer whose update is not ``θ − lr·ḡ_train``: momentum after
            the first update, weight decay, AdamW). With plain SGD and a fixed
            validation batch a step costs about an order-1 step.
        compile: ``order=1`` without ``precondition``, one process: once a
            signature's batches were confirmed to run as one whole batch, later
            steps compute their values as one ``torch.compile`` graph, as
            ``graddot(..., compile=True)`` does (the same numbers; a model that
            cannot be one graph keeps the eager path). For small models over many
            steps.
    """
    return TrainStep(model_fn, optimizer, order, precondition, group, curvature, compile)  # checked there
