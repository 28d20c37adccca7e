"""Hugging Face ``transformers`` models as ``(model_fn, params)``, with per-sample losses.

:func:`from_module` takes any ``torch.nn.Module`` whose forward takes keyword
inputs and returns logits (``transformers`` models, ``peft`` wrappers, your own
modules) and a loss ``loss(output, batch) -> [B]``; it returns
``model_fn(params, batch) -> [B]`` for :func:`ghostfunc.graddot` and the
trainable parameters (``requires_grad=True``), detached. Frozen parameters stay
inside the module as constants: no tap, no fallback, no cost.

What the model sees (``B`` samples; under :func:`graddot` ``B = 1`` per call):

- every batch key the model's ``forward`` names, except ``labels`` (kept for the
  loss); other keys (sample ids, weights) reach the loss only;
- ``use_cache=False`` when the forward takes ``use_cache``;
- for ``transformers`` models, ``attention_mask = ones_like(input_ids)`` when the
  batch has none (no padding; ``transformers`` would otherwise look for pad ids
  in the inputs, a data-dependent check);
- for ``transformers`` models with ``eager`` or ``sdpa`` attention, a 2-D
  ``attention_mask`` ``[B, T]`` (1 = token, 0 = padding) becomes the 4-D mask
  ``[B, 1, T, T]`` (causal models; with the sliding window where the config has
  one) or ``[B, 1, 1, T]`` (bidirectional encoders) that ``transformers`` would
  build itself: boolean for ``sdpa``, additive for ``eager``. ``transformers``
  uses a 4-D mask as it is (``masking_utils.create_causal_mask`` returns it
  unchanged), so the model never reaches the data-dependent ``is_causal``
  shortcut, whose answer differs between padded and unpadded samples and which
  ``vmap`` cannot take per sample. ``decoder_attention_mask`` likewise (causal);
- with such a mask and no ``position_ids`` in the batch,
  ``position_ids[b, t]`` = the number of real tokens before ``t`` (when the
  forward takes ``position_ids``), so padding on either side leaves every real
  token's position, hence its loss, unchanged;
- encoder-decoder models (``config.is_encoder_decoder``) given ``labels`` and no
  ``decoder_input_ids`` get ``model.prepare_decoder_input_ids_from_labels(labels)`` (a
  generating model without it, as Whisper, the labels shifted right; a classification
  head's labels are classes: its forward takes the decoder's inputs as it does itself).

The ready losses (each ``[B]``, one value per sample, computed in
``promote_types(logits.dtype, float32)``: float16/bfloat16 logits are taken to
float32 for the softmax, as ``transformers``' own losses do):

- :func:`causal_lm_loss`: mean next-token cross-entropy over the sample's kept
  targets;
- :func:`seq2seq_loss`: mean cross-entropy of the decoder logits against
  ``labels`` over the kept targets;
- :func:`classification_loss`: cross-entropy for integer ``labels`` (sequence or
  image classification), mean squared error for floating ``labels`` (regression).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from . import _dist
from ._draws import fork_rng
from ._interact import StateWrittenError, _ParamWrites, beyond_rounding, coarsest

Loss = Callable[[Any, Mapping[str, Any]], Tensor]

#: Label values that take no part in a loss (the ``transformers`` convention).
IGNORE_INDEX = -100


def from_module(
    model: nn.Module,
    loss: Loss,
    *,
    autocast: torch.dtype | None = None,
) -> tuple[Callable[[dict[str, Tensor], Mapping[str, Any]], Tensor], dict[str, Tensor]]:
    """``(model_fn, params)`` for :func:`ghostfunc.graddot` from a module and a per-sample loss.

    Args:
        model: a module whose forward takes the batch's keys as keyword arguments
            (a ``transformers`` model, a ``peft`` model, your own). Its mode is
            kept: ``model.train()`` runs dropout (see the README), ``model.eval()``
            does not. Not modified. A ``DistributedDataParallel`` wrapper is
            unwrapped (its ``.module``; use ``group=`` for the data parallelism);
            FSDP-sharded models are refused with what to pass instead.
        loss: ``loss(output, batch) -> [B]``, one loss per sample, with ``output``
            what ``model(**inputs)`` returns and ``batch`` the whole batch dict;
            e.g. :func:`causal_lm_loss`, :func:`seq2seq_loss`,
            :func:`classification_loss`.
        autocast: ``None`` (the model runs in its own dtype) or a torch dtype
            (``torch.bfloat16``, ``torch.float16``): the forward runs under
            ``torch.autocast`` with that dtype on the parameters' device type; the
            loss runs outside it.

    Returns:
        ``model_fn(params, batch) -> [B]`` and ``params``: name -> trainable
        parameter (``requires_grad=True``), detached; tied parameters appear once.

    Example (``model`` a causal LM, ``train``/``val`` dicts with ``input_ids`` and
    ``attention_mask``; the README has a runnable version)::

        model_fn, params = ghostfunc.from_module(model, ghostfunc.causal_lm_loss)
        out = ghostfunc.graddot(model_fn, params, train, val)
    """
    where = "from_module"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module; got {type(model).__name__}")
    model = _dist.unwrap(model, where)  # DDP: its .module; FSDP: refused (see ghostfunc._dist.unwrap)
    if not callable(loss):
        raise TypeError(f"{where}: loss must be callable as loss(output, batch) -> losses [B]; got {type(loss).__name__}")
    if autocast is not None and not (isinstance(autocast, torch.dtype) and autocast.is_floating_point):
        raise TypeError(f"{where}: autocast must be None or a floating torch.dtype (e.g. torch.bfloat16); "
                        f"got {autocast!r}")
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    if not params:
        raise ValueError(f"{where}: the model has no trainable parameters (requires_grad=True); "
                         f"unfreeze the ones to score")
    device_type = next(iter(params.values())).device.type
    specs: dict[tuple, _ModelSpec] = {}  # the config's attention settings -> the spec built under them
    native: dict[tuple, bool] = {}  # (settings, batch layout) -> whether the model takes the batch as it is (_agrees)

    def spec_now() -> tuple[tuple, _ModelSpec]:
        """The spec for the config as it is now: a sliding window or attention implementation set after
        ``from_module`` builds the masks it describes (a spec read once kept the old window: 1.08 off)."""
        settings = _ModelSpec.settings(model)
        if (spec := specs.get(settings)) is None:
            spec = specs[settings] = _ModelSpec.of(model)
        return settings, spec

    known = {k for k, _ in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))}
    checked: set[frozenset[str]] = set()  # the key sets seen to name the model's own tensors

    def run(p: dict[str, Tensor], batch: Mapping[str, Any], plain: bool, spec: _ModelSpec) -> Tensor:
        if (keys := frozenset(p)) not in checked:
            if unknown := sorted(keys - known):
                close = {k: difflib.get_close_matches(k, known, 1) for k in unknown}
                raise KeyError(f"{where}: params names {unknown}, which the model has no parameter or buffer of "
                               f"(a misspelt name leaves the real one a constant, scored 0 silently)"
                               + "".join(f"; did you mean {c[0]!r} for {k!r}?" for k, c in close.items() if c))
            checked.add(keys)
        inputs = spec.plain(batch, where) if plain else spec.inputs(batch, where)
        ctx = torch.autocast(device_type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        with ctx:
            output = functional_call(model, p, (), inputs, strict=False, tie_weights=True)
        return loss(output, batch)

    def model_fn(p: dict[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        """Per-sample losses ``[B]`` of ``model`` with parameters ``p`` on ``batch`` (a dict)."""
        settings, spec = spec_now()
        if not spec.rewrites(batch):
            return run(p, batch, True, spec)
        key = settings, layout(batch)
        if key not in native and _plain_call(batch):
            probe = unpadded(batch)  # padding is where the built inputs differ from the model's on purpose
            if all(v.shape[0] == 1 for v in probe.values() if isinstance(v, Tensor) and v.dim() > 0):
                probe = {k: torch.cat((v, v)) if isinstance(v, Tensor) and v.dim() > 0 else v  # one row says
                         for k, v in probe.items()}  # little about a layout's batches: judge on two
            shown = _unzeroed(p)  # (a zero head gives every input the same loss: it would prove nothing)
            wide, wide_probe = _widened(model, shown, probe)  # (and the rounding of a narrower dtype hides what
            native[key] = not _agrees(lambda plain: run(wide, wide_probe, plain, spec), wide,  # differs)
                                      None if wide is shown else lambda: _agrees(
                                          lambda plain: run(shown, probe, plain, spec), shown))
        return run(p, batch, native.get(key, False), spec)

    return model_fn, params


def layout(batch: Mapping[str, Any]) -> tuple:
    """A batch's keys, and its tensors' dtypes and shapes past the sample axis."""
    return tuple((k, (v.dtype, tuple(v.shape[1:])) if isinstance(v, Tensor) else type(v)) for k, v in batch.items())


def unpadded(batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` with its 2-D attention masks all ones: the same tokens, none of them padding."""
    return {k: torch.ones_like(v) if k in _MASKS and isinstance(v, Tensor) and v.dim() == 2 else v
            for k, v in batch.items()}


_MASKS = ("attention_mask", "decoder_attention_mask")


def _plain_call(batch: Mapping[str, Any]) -> bool:
    """Whether this call of ``model_fn`` runs on plain tensors outside any transform, where the model's own
    forward can run beside it (a first call inside ``vmap`` waits for one that is not)."""
    return torch._C._functorch.maybe_current_level() is None and all(
        type(v) is Tensor for v in batch.values() if isinstance(v, Tensor))


@contextlib.contextmanager
def _no_modes() -> Any:
    """No torch-function mode active (ghostfunc's interceptors see only the calls they run themselves)."""
    modes = [torch._C._pop_torch_function_stack() for _ in range(torch._C._len_torch_function_stack())]
    try:
        yield
    finally:
        for mode in reversed(modes):
            torch._C._push_on_torch_function_stack(mode)


def _unzeroed(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """``params`` with each floating tensor that is zero everywhere replaced by small seeded values (std 0.02, in its
    own shape and dtype): what :func:`_agrees` compares the two ways of building the inputs under. A zero-initialised
    classifier head (a common fine-tuning start) makes every input give the same loss, and a check on losses passed
    RoBERTa's position ids counted from 0 instead of after the padding id (scores 4e-2 off); which inputs the model
    needs does not depend on the parameters' values."""
    zero = [k for k, v in params.items() if v.is_floating_point() and v.numel() and not bool(v.detach().any())]
    if not zero:
        return params
    g = torch.Generator().manual_seed(0)
    with _no_modes():  # (drawn for real: the checks' interception would run the draw as a constant)
        return {**params, **{k: (0.02 * torch.randn(params[k].shape, generator=g)).to(params[k]) for k in zero}}


#: Up to how many bytes of float64 copies :func:`_widened` makes (64 Mi elements); a larger model is compared in
#: its own dtype.
WIDEN_BYTES = 2 ** 29


def _widened(model: nn.Module, params: dict[str, Tensor], probe: dict[str, Any]) -> tuple[dict[str, Tensor],
                                                                                          dict[str, Any]]:
    """``params``, the model's other parameters (frozen ones) and its floating buffers, and the floating tensors of
    ``probe`` (``inputs_embeds``, ``pixel_values``), in float64 (up to :data:`WIDEN_BYTES` of copies; a larger model
    as it is): what :func:`_agrees` compares the two ways of building the inputs in, so that what differs is not
    inside the rounding of the model's dtype. In bfloat16 the two ways differed by 1.5e-3 of DeBERTa-v2's losses
    and the built 4-D mask was kept, which DeBERTa reads as 0/1 (NaN losses on every padded row); in float32,
    RoBERTa fed ``inputs_embeds`` kept position ids counted from 0 (2e-4 off, under float32's ``sqrt(eps)``).
    Frozen parameters are widened too: left 16-bit, the model's own forward failed on the mixed dtypes, which read
    as a model that needs the built inputs (the same NaN rows; RoBERTa's positions, 1.3e-3 off)."""
    wide = torch.float64
    rest = {k: v for k, v in (*model.named_parameters(), *model.named_buffers())
            if v.is_floating_point() and v.dtype != wide and k not in params}
    narrow = [v for v in (*params.values(), *rest.values()) if v.is_floating_point() and v.dtype != wide]
    if not narrow or sum(v.numel() for v in narrow) * wide.itemsize > WIDEN_BYTES:
        return params, probe

    def widen(v: Any) -> Any:
        return v.detach().to(wide) if isinstance(v, Tensor) and v.is_floating_point() and v.dtype != wide else v

    return ({**{k: widen(v) for k, v in params.items()}, **{k: widen(v) for k, v in rest.items()}},
            {k: widen(v) for k, v in probe.items()})


def _agrees(losses: Callable[[bool], Tensor], params: Mapping[str, Tensor],
            unwidened: Callable[[], bool] | None = None) -> bool:
    """Whether the inputs :func:`from_module` builds give the losses of the model's own forward on a batch
    without padding (with padding they differ on purpose: see :func:`from_module`).

    Both run without gradients, from the same random state, outside any ghostfunc
    interceptor but under a guard that refuses a write into ``params`` before it happens
    (RWKV rescales its weights in place on its first forward in eval mode: refused, with the parameters
    as they were, as any ``model_fn`` that writes into them); they agree up to rounding in the coarser of the parameters' and the
    losses' dtypes (:func:`ghostfunc._interact.beyond_rounding`). Where the model's own forward fails, the
    built inputs are kept where they run (they are what the model needs); where they fail too, or only the built inputs
    fail, or the two disagree
    (RoBERTa-style position ids that start after the padding id, DeBERTa's 0/1 4-D
    masks, a causal model no attention module marks ``is_causal``, local attention
    the config does not describe), the batch is passed as it is.
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with _no_modes(), _ParamWrites(params), torch.no_grad(), fork_rng(devices):
        states = [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in devices)]
        own: Any = _FAILED
        try:
            own = losses(True)
        except StateWrittenError:
            raise
        except Exception:  # noqa: BLE001 - the model needs the built inputs (or does not run widened: see below)
            pass
        if own is not _FAILED:
            return _built_agrees(losses, params, own, states, devices)
        if unwidened is None:  # the built inputs where they run; where they fail too, the batch as it is, so the
            try:  # model's own error is the one the caller sees (XGLM in float64 overflows in its own mask: its
                losses(False)  # built mask, which no module marks causal, gave an error about a mask the caller
            except StateWrittenError:  # never made, h55)
                raise
            except Exception:  # noqa: BLE001
                return False
            return True
    return unwidened()  # (in its own dtype, where it failed in float64)


_FAILED = object()


def _built_agrees(losses: Callable[[bool], Tensor], params: Mapping[str, Tensor], own: Any, states: list[Tensor],
                  devices: list[int]) -> bool:
    """:func:`_agrees` once the model's own forward gave ``own``: the built inputs from the same random state."""
    torch.set_rng_state(states[0])
    for d, state in zip(devices, states[1:], strict=True):
        torch.cuda.set_rng_state(state, d)
    try:
        built = losses(False)
    except StateWrittenError:
        raise
    except Exception:  # noqa: BLE001 - the model takes no such inputs: pass the batch as it is
        return False
    if not isinstance(own, Tensor) or not isinstance(built, Tensor) or own.shape != built.shape:
        return own is built
    return not bool(beyond_rounding(own, built, coarsest([*params.values(), own]))[0].any())


class _ModelSpec:
    """What :func:`from_module` needs to know about a model to build its keyword inputs."""

    def __init__(self, accepts: frozenset[str], causal: bool, encoder_decoder: bool, attn: str | None,
                 window: int | None, layer_types: frozenset[str], mask_dtype: torch.dtype,
                 decoder_ids: Callable[[Tensor], Tensor] | None, required: frozenset[str] = frozenset()) -> None:
        self.accepts = accepts
        self.required = required  # arguments of forward without a default
        self.causal = causal
        self.window = window
        self.layer_types = layer_types
        self.encoder_decoder = encoder_decoder
        self.attn = attn
        self.mask_dtype = mask_dtype
        self.decoder_ids = decoder_ids

    @staticmethod
    def _base(model: nn.Module) -> Any:
        get_base = getattr(model, "get_base_model", None)  # peft wrappers name the inputs of the model inside
        return get_base() if callable(get_base) else model

    @classmethod
    def settings(cls, model: nn.Module) -> tuple:
        """What of the config the built masks follow, read on every call: the attention implementation, the
        sliding window and the layer types."""
        config: Any = getattr(cls._base(model), "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return tuple(_as_key(getattr(text, k, None)) for k in ("_attn_implementation", "sliding_window", "layer_types"))

    @classmethod
    def of(cls, model: nn.Module) -> _ModelSpec:
        base: Any = cls._base(model)
        sig = inspect.signature(base.forward).parameters
        accepts = frozenset(k for k, v in sig.items() if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL))
        required = frozenset(k for k, v in sig.items() if k in accepts and v.default is inspect.Parameter.empty)
        config: Any = getattr(base, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        attn = getattr(text, "_attn_implementation", None)  # None: not a transformers model
        encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        causal = any(getattr(m, "is_causal", False) is True for m in base.modules())  # HF attention modules say
        try:
            emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
        except NotImplementedError:  # models without input embeddings (image classifiers)
            emb = None
        weight = getattr(emb, "weight", None)
        mask_dtype = weight.dtype if isinstance(weight, Tensor) and weight.is_floating_point() else torch.float32
        decoder_ids = getattr(base, "prepare_decoder_input_ids_from_labels", None) if encoder_decoder else None
        start = getattr(config, "decoder_start_token_id", None)
        generates = getattr(base, "can_generate", None)
        if encoder_decoder and decoder_ids is None and isinstance(start, int) and callable(generates) and generates():
            # Whisper: its forward shifts labels. Not a classification or question-answering head
            # (BartForSequenceClassification): its labels are classes, its forward takes the decoder's
            # inputs from input_ids itself.
            decoder_ids = functools.partial(shift_right, start=start, pad=getattr(config, "pad_token_id", None))
        window = getattr(text, "sliding_window", None)
        layer_types = frozenset(getattr(text, "layer_types", None) or ())
        return cls(accepts, causal, encoder_decoder, attn, window, layer_types, mask_dtype, decoder_ids, required)

    def plain(self, batch: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The batch's keys the model's forward names (not ``labels``), ``use_cache=False``, and decoder
        inputs from the labels for encoder-decoder models: what the model would be called with."""
        if not isinstance(batch, Mapping):
            raise TypeError(f"{where}: model_fn expects the batch as a dict of model inputs "
                            f"(e.g. {{'input_ids': ..., 'attention_mask': ...}}); got {type(batch).__name__}")
        out = {k: v for k, v in batch.items() if k in self.accepts and k != "labels"}
        if "use_cache" in self.accepts and "use_cache" not in out:
            out["use_cache"] = False
        labels = batch.get("labels")
        if self.decoder_ids is not None and "decoder_input_ids" not in out and isinstance(labels, Tensor):
            # a copy: FSMT's shift writes the pad id over the -100s in place (the caller's labels, then the loss's)
            out["decoder_input_ids"] = self.decoder_ids(labels.clone())
        missing = sorted(self.required - out.keys())
        if missing:
            raise TypeError(f"{where}: the model's forward needs {missing}, which the batch does not have (its keys: "
                            f"{list(batch)}); the batch's keys are passed as the forward's keyword arguments "
                            f"({sorted(self.accepts)})")
        return out

    def rewrites(self, batch: Any) -> bool:
        """Whether :meth:`inputs` may give the model more than :meth:`plain` (a mask, position ids)."""
        return self.attn is not None and isinstance(batch, Mapping)

    def inputs(self, batch: Mapping[str, Any], where: str) -> dict[str, Any]:
        out = self.plain(batch, where)
        ids = out.get("input_ids")
        if self.attn is not None and "attention_mask" in self.accepts and "attention_mask" not in out \
                and isinstance(ids, Tensor) and ids.dim() == 2:
            out["attention_mask"] = torch.ones_like(ids)  # no padding; skips HF's data-dependent padding check
        mask = out.get("attention_mask")
        if self.attn in ("eager", "sdpa") and isinstance(mask, Tensor) and mask.dim() == 2 and _over_tokens(mask, out):
            if "position_ids" in self.accepts and "position_ids" not in out and not self.encoder_decoder:
                out["position_ids"] = real_positions(mask)
            out["attention_mask"] = self.mask(mask, causal=self.causal and not self.encoder_decoder)
        dmask = out.get("decoder_attention_mask")
        if self.attn in ("eager", "sdpa") and isinstance(dmask, Tensor) and dmask.dim() == 2:
            out["decoder_attention_mask"] = self.mask(dmask, causal=True)
        return out

    def mask(self, mask: Tensor, causal: bool) -> Tensor | dict[str, Tensor]:
        """``[B, T]`` padding mask -> the 4-D mask the model's attention implementation takes.

        A sliding window (``config.sliding_window``) that is shorter than the
        sequence is applied to every layer, or, when ``config.layer_types`` mixes
        full and sliding layers, given per layer type as a dict (as Qwen2-style
        models take it).
        """
        dtype = None if self.attn == "sdpa" else self.mask_dtype
        full = attention_mask_4d(mask, causal=causal, dtype=dtype)
        sliding = not self.layer_types or "sliding_attention" in self.layer_types
        if not causal or self.window is None or not sliding or mask.shape[-1] <= self.window:
            return full  # no window, or it never binds
        local = attention_mask_4d(mask, causal=True, dtype=dtype, window=self.window)
        if self.layer_types <= {"sliding_attention"}:
            return local  # every layer slides (Mistral)
        return {"full_attention": full, "sliding_attention": local}


def _as_key(value: Any) -> Any:
    """A config value as part of a dict key: itself where it hashes, else its type and repr (a list of per-layer
    windows, a dict of layer types: a change in place is another key)."""
    try:
        hash(value)
    except TypeError:
        return type(value), repr(value)
    return value


def _over_tokens(mask: Tensor, inputs: Mapping[str, Any]) -> bool:
    """Whether a ``[B, T]`` mask is over the tokens the attention sees: the length of ``input_ids`` or
    ``inputs_embeds``. An audio model's mask is over raw samples (``input_values``), which its feature encoder
    shortens before any attention: the model builds its own mask from it, and a 4-D one of the raw length is
    wrong (it ran, with another loss for a padded row, on one row, and failed on more)."""
    tokens = inputs.get("input_ids")
    if not isinstance(tokens, Tensor):
        tokens = inputs.get("inputs_embeds")
    return isinstance(tokens, Tensor) and tokens.dim() >= 2 and tokens.shape[:2] == mask.shape


def shift_right(labels: Tensor, *, start: int, pad: int | None) -> Tensor:
    """Decoder inputs from ``labels`` ``[B, T]``: ``start`` then the labels but the last, ``-100`` as ``pad`` (what
    an encoder-decoder model's forward does with ``labels`` when it has no ``prepare_decoder_input_ids_from_labels``)."""
    out = labels.new_full(labels.shape, start)
    out[:, 1:] = labels[:, :-1]
    return out.masked_fill(out == -100, pad if pad is not None else 0)


def real_positions(attention_mask: Tensor) -> Tensor:
    """``[B, T] -> [B, T]``: each position's index among the sample's real tokens (0 on leading padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def attention_mask_4d(attention_mask: Tensor, *, causal: bool, dtype: torch.dtype | None,
                      window: int | None = None) -> Tensor:
    """A 2-D padding mask as the 4-D mask ``transformers`` attention takes.

    Args:
        attention_mask: ``[B, T]``, nonzero for tokens, zero for padding.
        causal: ``[B, 1, T, T]`` with ``key <= query`` as well, else ``[B, 1, 1, T]``
            (broadcast over queries; also right for cross-attention to these keys).
        dtype: ``None`` for a boolean mask (``True`` = attend; ``sdpa``), or a
            floating dtype for an additive mask (``0`` where attended, a large
            negative value elsewhere; ``eager``).
        window: with ``causal``, keep only keys with ``query - key < window``
            (``transformers``' sliding window).

    Returns:
        the 4-D mask.
    """
    keep = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
    if causal:
        t = attention_mask.shape[-1]
        q = torch.arange(t, device=attention_mask.device)[:, None]  # [T, 1]
        k = torch.arange(t, device=attention_mask.device)[None, :]  # [1, T]
        band = k <= q if window is None else (k <= q) & (k > q - window)  # [T, T]
        keep = keep & band  # [B, 1, T, T]
    if dtype is None:
        return keep
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(keep, zero, _mask_min(dtype))


def _mask_min(dtype: torch.dtype) -> float:
    """The additive mask value: ``finfo(dtype).min``, but float32's for float64.

    Many models take the softmax in float32; float64's minimum becomes ``-inf`` there
    and a fully masked row (a query on left padding) turns into NaN. float32's
    minimum still gives those keys exactly zero weight.
    """
    return torch.finfo(torch.float32 if dtype == torch.float64 else dtype).min


def _get(batch: Mapping[str, Any], key: str, where: str, what: str) -> Tensor:
    value = batch.get(key) if isinstance(batch, Mapping) else None
    if not isinstance(value, Tensor):
        keys = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"{where}: the batch needs {key!r} ({what}); it has {keys}")
    return value


def _token_logits(output: Any, labels: Tensor, where: str, label_key: str) -> Tensor:
    """``output.logits`` ``[B, T, V]``, checked against the integer ``labels`` ``[B, T]`` (errors name what came)."""
    logits = getattr(output, "logits", None)
    if not isinstance(logits, Tensor):
        raise TypeError(f"{where}: expected the model's output to have .logits (a tensor [B, T, V]); got "
                        f"{type(output).__name__}. For a module that returns a tensor, pass your own loss: "
                        f"loss(output, batch) -> [B]")
    if labels.is_floating_point() or labels.dim() != 2:
        raise ValueError(f"{where}: {label_key!r} must be integer token ids [B, T]; got {labels.dtype} of shape "
                         f"{tuple(labels.shape)}")
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f"{where}: expected logits [B, T, V] with [B, T] = {list(labels.shape)} (those of "
                         f"{label_key!r}); got logits of shape {tuple(logits.shape)}")
    return logits


def _padding_mask(batch: Mapping[str, Any], key: str, like: Tensor, where: str) -> Tensor | None:
    """The batch's 2-D padding mask ``[B, T]`` as bool (``None``: none given); a mask of another shape is refused
    unless the batch has ``labels`` (then ``-100`` marks what the loss leaves out)."""
    mask = batch.get(key)
    if not isinstance(mask, Tensor):
        return None
    if mask.shape == like.shape:
        return mask.bool()
    if "labels" in batch and mask.dim() != 2:
        return None
    raise ValueError(f"{where}: {key!r} must be the padding mask [B, T] = {list(like.shape)} the loss leaves padded "
                     f"targets out by; got shape {tuple(mask.shape)}. With another mask (a 4-D attention mask), "
                     f"pass 'labels' with -100 at the targets to leave out")


def _token_loss(logits: Tensor, labels: Tensor, keep: Tensor) -> Tensor:
    """``[B, T, V]``, ``[B, T]``, ``[B, T]`` bool -> ``[B]``: mean cross-entropy over kept tokens."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    target = labels.masked_fill(~keep, IGNORE_INDEX)
    nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none", ignore_index=IGNORE_INDEX)  # [B, T]
    return nll.sum(-1) / keep.sum(-1).clamp(min=1)


def causal_lm_loss(output: Any, batch: Mapping[str, Any]) -> Tensor:
    """Next-token cross-entropy, averaged over each sample's kept targets: ``[B]``.

    ``ℓ_b = mean_{t ∈ K_b} -log softmax(logits[b, t - 1])[y[b, t]]`` with ``y`` the
    batch's ``labels`` (``[B, T]``) or, without them, its ``input_ids``, and
    ``K_b = {t ≥ 1 : y[b, t] != -100 and attention_mask[b, t - 1] != 0 and
    attention_mask[b, t] != 0}`` (no ``attention_mask``: every ``t ≥ 1``). With
    :func:`from_module`'s masks and positions, padding on either side leaves
    ``ℓ_b`` unchanged. A sample with no kept target has loss 0. ``output.logits``
    is ``[B, T, V]``.
    """
    where, key = "causal_lm_loss", "labels" if "labels" in batch else "input_ids"
    labels = _get(batch, key, where, "[B, T] token ids")
    logits = _token_logits(output, labels, where, key)  # [B, T, V]
    keep = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]: targets 1..T-1
    real = _padding_mask(batch, "attention_mask", labels, where)
    if real is not None:
        keep = keep & real[:, 1:] & real[:, :-1]  # a real target predicted from a real position
    return _token_loss(logits[:, :-1], labels[:, 1:], keep)


def seq2seq_loss(output: Any, batch: Mapping[str, Any]) -> Tensor:
    """Decoder cross-entropy, averaged over each sample's kept targets: ``[B]``.

    ``ℓ_b = mean_{t ∈ K_b} -log softmax(logits[b, t])[labels[b, t]]`` with
    ``K_b = {t : labels[b, t] != -100 and decoder_attention_mask[b, t] != 0}``;
    ``output.logits`` is ``[B, T_dec, V]`` and the decoder inputs are the labels
    shifted right (:func:`from_module` derives them).
    """
    where = "seq2seq_loss"
    labels = _get(batch, "labels", where, "[B, T_dec] target ids, -100 where none")
    logits = _token_logits(output, labels, where, "labels")
    keep = labels != IGNORE_INDEX
    real = _padding_mask(batch, "decoder_attention_mask", labels, where)
    if real is not None:
        keep = keep & real
    return _token_loss(logits, labels, keep)


def classification_loss(output: Any, batch: Mapping[str, Any]) -> Tensor:
    """One label per sample: ``[B]``.

    Integer ``labels`` ``[B]``: ``ℓ_b = -log softmax(logits[b])[labels[b]]``
    (sequence or image classification, ``output.logits`` ``[B, C]``). Floating
    ``labels`` shaped like the logits (``[B]`` or ``[B, 1]`` for one output,
    ``[B, C]``): ``ℓ_b = mean_c (logits[b, c] - labels[b, c])²`` (regression, HF's
    ``problem_type="regression"``; for multi-label targets write the loss with
    ``F.binary_cross_entropy_with_logits(..., reduction="none").mean(-1)``). Floating
    labels ``[B]`` for ``C > 1`` outputs (class ids read from a float column) are refused.
    """
    where = "classification_loss"
    logits = getattr(output, "logits", None)
    if not isinstance(logits, Tensor):
        raise TypeError(f"{where}: expected the model's output to have .logits (a tensor [B, C]); got "
                        f"{type(output).__name__}. For a module that returns a tensor, pass your own loss: "
                        f"loss(output, batch) -> [B]")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # [B, C]
    labels = _get(batch, "labels", where, "[B] class ids, or float regression targets")
    if logits.dim() != 2:
        raise ValueError(f"{where}: expected logits [B, C] (one prediction per sample); got shape "
                         f"{tuple(logits.shape)} (token classification: write a loss that averages over tokens)")
    if not labels.is_floating_point():
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"{where}: integer labels must be class ids of shape [B] = {list(logits.shape[:1])}; "
                             f"got shape {tuple(labels.shape)}")
        try:
            return F.cross_entropy(logits, labels, reduction="none")
        except IndexError as err:  # (torch's "Target 5 is out of bounds." named neither labels nor the range)
            raise IndexError(f"{where}: labels must be class ids from 0 to {logits.shape[-1] - 1} (the model has "
                             f"{logits.shape[-1]} outputs; -100 is ignored); got one outside: {err}") from err
    if labels.reshape(labels.shape[0], -1).shape != logits.shape:
        hint = " (class ids in a float tensor? pass labels.long())" if labels.shape == logits.shape[:1] else ""
        raise ValueError(f"{where}: floating labels are regression targets shaped like the logits "
                         f"{tuple(logits.shape)}; got shape {tuple(labels.shape)}{hint}")
    diff = logits.reshape(labels.shape[0], -1) - labels.reshape(labels.shape[0], -1).to(logits.dtype)
    return diff.square().mean(-1)
