"""``python -m ghostfunc [check|demo|evaluate|attribute|train|select]``.

- ``check`` (the default): scores a tiny GPT-2 built from a config (no download),
  prints the scores, the plan, and their agreement with a loop of single-sample
  backward passes.
- ``demo``: trains with data values on embedded data (see ``ghostfunc._demo``).
- ``evaluate``: LDS, noisy-label AUROC and removal curves of every attribution
  method on scikit-learn's digits (see ``ghostfunc._evaluate``; ``evaluate --help``).
- ``attribute --run DIR``: unrolled values of a recorded run (see ``ghostfunc._attribute``).
- ``train``: trains a language model on a corpus and values every training chunk
  (see ``ghostfunc._run``; ``python -m ghostfunc train --help``).
- ``select``: retrains on halves picked by a train run's values (``ghostfunc._run.select``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence


def check(seed: int = 0, n_train: int = 8, n_val: int = 4, seq_len: int = 32) -> float:
    """Run graddot on a tiny GPT-2 and return the relative error against the naive loop."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    from . import graddot, reference_graddot

    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:  # pragma: no cover - the dev extra has it
        sys.exit("python -m ghostfunc check needs transformers: pip install 'ghostfunc[hf]'")

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=256, n_positions=seq_len, n_embd=64, n_layer=2, n_head=4,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(cfg).to(torch.float64).eval()  # type: ignore[arg-type]
    params = {k: v.detach() for k, v in model.named_parameters()}

    def model_fn(p: dict, ids: torch.Tensor) -> torch.Tensor:
        # An explicit attention mask also skips HF's data-dependent padding check (no .item() under vmap).
        kwargs = {"attention_mask": torch.ones_like(ids), "use_cache": False}
        logits = functional_call(model, p, (ids,), kwargs).logits[:, :-1]  # [B, T-1, V]
        return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)  # [B]

    train = torch.randint(1, cfg.vocab_size, (n_train, seq_len))
    val = torch.randint(1, cfg.vocab_size, (n_val, seq_len))
    t0 = time.perf_counter()
    out = graddot(model_fn, params, train, val)
    t_ghost = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref, _, _ = reference_graddot(model_fn, params, train, val)
    t_loop = time.perf_counter() - t0
    err = ((out.scores - ref).abs().max() / ref.abs().max()).item()
    print(f"tiny GPT-2 ({sum(v.numel() for v in params.values()):,} params, float64), "
          f"n_train={n_train}, n_val={n_val}, T={seq_len}")
    print(out.plan)
    print("\n  i   graddot score        naive loop")
    for i, (a, b) in enumerate(zip(out.scores.tolist(), ref.tolist(), strict=True)):
        print(f"{i:3d}  {a: .12e}  {b: .12e}")
    print(f"\nmax relative error {err:.2e}; graddot {t_ghost * 1e3:.0f} ms, loop {t_loop * 1e3:.0f} ms")
    return err


#: Subcommands with parsers of their own: ``python -m ghostfunc NAME --help``.
SUBCOMMANDS = {"demo": "._demo", "evaluate": "._evaluate", "attribute": "._attribute", "train": "._run.train",
               "select": "._run.select"}


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given and given[0] in SUBCOMMANDS:  # their own options and --help
        import importlib

        return importlib.import_module(SUBCOMMANDS[given[0]], __package__).main(given[1:])
    argv = given
    parser = argparse.ArgumentParser(prog="python -m ghostfunc", description=(__doc__ or "").replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="check", choices=("check", *SUBCOMMANDS))
    from . import __version__

    parser.add_argument("--version", action="version", version=f"ghostfunc {__version__}")
    parser.parse_args(argv)
    err = check()
    return 0 if err < 1e-10 else 1


def _leave(code: int) -> None:
    """Exit with ``code``. Under ``torchrun`` (``WORLD_SIZE > 1``) the subcommand has torn its process group down
    already; the interpreter's own teardown, which destroys gloo's C++ objects in no set order, is skipped
    (``os._exit`` after flushing): now and then it aborted a finished rank ("terminate called without an active
    exception"), and torchrun then reports the whole run as failed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


if __name__ == "__main__":
    _leave(main())
