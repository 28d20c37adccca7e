"""Model presets built from ``transformers`` configs (no download), or a local Hugging Face folder.

``--model gpt2|llama|neox`` with ``--size tiny|mini|small``; ``small`` is the real
small shape of each family (GPT-2 small; Pythia-160M for GPT-NeoX; SmolLM-135M for
Llama), its parameter count set by the vocabulary (GPT-2 small is 124M at its own
50,257 tokens, about 86M at the byte tokenizer's 256). ``tiny`` trains on 2 CPU
cores in about two minutes. Every preset has dropout 0 (per-sample values and
exact resumes need a deterministic forward) and special token ids inside the
vocabulary. ``--model PATH`` loads a local folder with ``from_pretrained``
(offline, ``local_files_only=True``).

Dtype names map to ``torch.dtype`` once, here (:func:`dtype`); nothing else sees a string.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import UsageError

FAMILIES = ("gpt2", "llama", "neox")
SIZES = ("tiny", "mini", "small")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTOCAST = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: (hidden width, layers, heads, kv heads, MLP width, positions) per family and size.
SHAPES: dict[str, dict[str, tuple[int, int, int, int, int, int]]] = {
    "gpt2": {"tiny": (128, 2, 4, 4, 512, 1024), "mini": (256, 4, 4, 4, 1024, 1024), "small": (768, 12, 12, 12, 3072, 1024)},
    "llama": {"tiny": (128, 2, 4, 2, 344, 2048), "mini": (256, 4, 4, 2, 688, 2048), "small": (576, 30, 9, 3, 1536, 2048)},
    "neox": {"tiny": (128, 2, 4, 4, 512, 2048), "mini": (256, 4, 4, 4, 1024, 2048), "small": (768, 12, 12, 12, 3072, 2048)},
}


def dtype(name: str, option: str, table: dict[str, Any]) -> Any:
    """The torch dtype named ``name`` in ``table`` (``DTYPES`` or ``AUTOCAST``), or a :class:`UsageError`."""
    if name not in table:
        raise UsageError(f"{option}: expected one of {', '.join(table)}; got {name!r}")
    return table[name]


def preset_config(family: str, size: str, vocab: int) -> Any:
    """A ``transformers`` config for ``family`` at ``size`` with ``vocab`` tokens (GPT-NeoX: rotary on a quarter of each head, its default)."""
    import transformers as tf

    if family not in SHAPES:
        raise UsageError(f"--model: expected one of {', '.join(FAMILIES)} or a local Hugging Face folder; got {family!r}")
    if size not in SHAPES[family]:
        raise UsageError(f"--size: expected one of {', '.join(SIZES)}; got {size!r}")
    d, layers, heads, kv, mlp, pos = SHAPES[family][size]
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=d, n_layer=layers, n_head=heads, n_inner=mlp, n_positions=pos,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "llama":
        return tf.LlamaConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                              num_key_value_heads=kv, intermediate_size=mlp, max_position_embeddings=pos,
                              tie_word_embeddings=True, attention_dropout=0.0, bos_token_id=0, eos_token_id=0,
                              # no padding row (Llama makes pad_token_id its embedding's padding_idx): sequences are
                              # never padded here, id 0 is text, and a padding row that the tied head trains moves
                              # while torch's backward holds its lookups constant (unroll's values 17% off)
                              pad_token_id=None)
    return tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=mlp, max_position_embeddings=pos,
                            hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def positions(config: Any) -> int | None:
    """The longest sequence the model's position embeddings cover (``None``: not stated)."""
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def build(model: str, size: str, *, vocab: int, seq_len: int, param_dtype: torch.dtype, seed: int,
          need: int = 0, vocab_option: bool = False) -> nn.Module:
    """The model, in ``param_dtype``, in eval mode (dropout off), checked against ``vocab`` and ``seq_len``.

    Args:
        model: a family in ``FAMILIES`` or a local Hugging Face folder.
        size: a size in ``SIZES`` (ignored for a folder).
        vocab: a preset's vocabulary (at least ``need``).
        seq_len: tokens per chunk.
        param_dtype: the parameters' dtype.
        seed: seeds the random initialisation of a preset.
        need: the data's largest token id + 1 (a local folder's vocabulary must cover it).
        vocab_option: ``vocab`` was given as ``--vocab-size`` (a local folder's vocabulary must then equal it).
    """
    import transformers as tf

    tf.logging.set_verbosity_error()
    if Path(model).is_dir():
        try:
            net = tf.AutoModelForCausalLM.from_pretrained(model, local_files_only=True, torch_dtype=param_dtype)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--model: expected a local Hugging Face causal-LM folder (config.json and weights); "
                             f"{model!r}: {str(exc).splitlines()[0]}") from None
        config = net.config
        if config.vocab_size < need:
            raise UsageError(f"--model: expected a vocabulary of at least {need} tokens (the data's largest id + 1); "
                             f"{model!r} has {config.vocab_size}")
        if vocab_option and config.vocab_size != vocab:
            raise UsageError(f"--vocab-size: expected 0 or the vocabulary of --model {model!r} ({config.vocab_size}); "
                             f"got {vocab}")
    else:
        config = preset_config(model, size, vocab)
        torch.manual_seed(seed)
        net = tf.AutoModelForCausalLM.from_config(config).to(param_dtype)
    check_seq_len(config, seq_len)
    return net.eval()


def check_seq_len(config: Any, seq_len: int) -> None:
    """Refuse chunks longer than the model's positions."""
    limit = positions(config)
    if limit is not None and seq_len > limit:
        raise UsageError(f"--seq-len: expected at most {limit} (the model's positions); got {seq_len}")


def config_of(model: str, size: str) -> Any:
    """The model's config without building the model (a preset's, or a local folder's ``config.json``)."""
    import transformers as tf

    if not Path(model).is_dir():
        return preset_config(model, size, 256)
    try:
        return tf.AutoConfig.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model: expected a local Hugging Face causal-LM folder (config.json and weights); "
                         f"{model!r}: {str(exc).splitlines()[0]}") from None
