"""Corpora as fixed-length chunks: ``chunk index = sample index``, each chunk knows its source file.

A corpus is a flat token array (a ``numpy`` memmap) cut into chunks of
``seq_len`` tokens. Three inputs give one:

- a **token file** (``*.bin``): a flat array of ``uint16``/``uint32`` token ids,
  the layout nanoGPT-style pipelines write; chunk ``i`` is tokens
  ``[i·T, (i+1)·T)`` and its source is the file;
- a **folder, glob or text file**: every text file (UTF-8, no NUL bytes; the
  others are skipped and counted in :func:`describe`) is tokenized with the byte-level tokenizer (token = byte, vocabulary 256, nothing to
  download) into a cache beside the output (``<out>/../.ghostfunc-cache/``),
  once; a file's chunks never run into the next file (its last ``len % T``
  tokens are dropped), so every chunk has exactly one source;
- ``stdlib``: the embedded default corpus, Python's own standard-library sources
  (found beside ``os.__file__``). Training holds every ``*.py`` file outside
  ``site-packages``, the test suites and the ``--target`` package; the target's
  files are split alternately (sorted by path) into a validation half (scored
  against) and a test half (held out: only ``ghostfunc select`` and the curves
  look at it).

Errors are :class:`UsageError` with a one-line message naming the option.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: The byte-level tokenizer's vocabulary: one token per byte value.
BYTE_VOCAB = 256
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
#: Folders of the standard library that are not library code.
STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


class UsageError(Exception):
    """Bad command-line input: the CLI prints ``ghostfunc <command>: error: <message>`` and exits with code 2."""


@dataclass(frozen=True)
class Corpus:
    """Chunks of one token array.

    Attributes:
        tokens: ``[n_tokens]`` token ids (a read-only memmap).
        starts: ``[N]`` int64, where chunk ``i`` starts in ``tokens``.
        source: ``[N]`` int64, the index in ``sources`` of chunk ``i``'s file.
        sources: the source names (file paths relative to the corpus root).
        seq_len: tokens per chunk ``T``.
        byte_level: the tokens are bytes (they decode back to text).
        skipped: ``(file, reason)`` of the files left out (empty, binary, not UTF-8).
    """

    tokens: np.ndarray
    starts: np.ndarray
    source: np.ndarray
    sources: tuple[str, ...]
    seq_len: int
    byte_level: bool
    skipped: tuple[tuple[str, str], ...] = ()

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, index: Tensor) -> Tensor:
        """``[B]`` chunk indices -> ``[B, T]`` int64 token ids, row ``b`` = chunk ``index[b]``."""
        rows = [self.tokens[s:s + self.seq_len] for s in self.starts[index.numpy()]]
        return torch.from_numpy(np.stack(rows).astype(np.int64)) if rows else torch.zeros(0, self.seq_len, dtype=torch.int64)

    def text(self, i: int) -> str:
        """Chunk ``i`` decoded (bytes as UTF-8, or the token ids when the tokens are not bytes)."""
        ids = self.tokens[self.starts[i]:self.starts[i] + self.seq_len]
        if self.byte_level:
            return bytes(np.asarray(ids, dtype=np.uint8)).decode("utf-8", errors="replace")
        return " ".join(str(int(t)) for t in ids)

    def subset(self, keep: np.ndarray) -> Corpus:
        """The chunks at positions ``keep`` (renumbered from 0), same tokens and sources."""
        return Corpus(self.tokens, self.starts[keep], self.source[keep], self.sources, self.seq_len, self.byte_level,
                      self.skipped)

    def vocab_needed(self) -> int:
        """One more than the largest token id any chunk holds (256 for bytes)."""
        if self.byte_level:
            return BYTE_VOCAB
        return int(self.tokens.max()) + 1 if len(self.tokens) else 0


def stdlib_root() -> Path:
    """The folder of Python's standard-library sources (the one holding ``os.py``)."""
    return Path(os.__file__).resolve().parent


def stdlib_files(target: str) -> tuple[list[Path], list[Path], list[Path]]:
    """``(train, val, test)`` source files of the embedded corpus for target package ``target``.

    Raises:
        UsageError: ``target`` is not a package or module of the standard library.
    """
    root = stdlib_root()
    parts = Path(target).parts
    if not target.strip() or Path(target).is_absolute() or any(p in ("..", ".") for p in parts) or "\0" in target:
        raise UsageError(f"--target: expected the name of a package or module of the standard library (email, asyncio, "
                         f"...); got {target!r}")
    pkg, mod = root / target, root / f"{target}.py"
    if pkg.is_dir():
        target_files = sorted(p for p in pkg.rglob("*.py") if not STDLIB_SKIP & set(p.relative_to(root).parts[:-1]))
    elif mod.is_file():
        target_files = [mod]
    else:
        raise UsageError(f"--target: expected a package or module of the standard library in {root}; got {target!r}")
    if len(target_files) < 2:
        raise UsageError(f"--target: expected a package with at least 2 source files (half validation, half test); "
                         f"{target!r} has {len(target_files)}")
    held = set(target_files)
    train = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP]  # prune: site-packages alone can be huge
        train += [p for p in (Path(folder) / n for n in names if n.endswith(".py")) if p not in held]
    train.sort()
    return train, target_files[0::2], target_files[1::2]


def text_files(spec: str, option: str) -> tuple[Path, list[Path]]:
    """The text files a folder, glob or file names, and the root their names are relative to."""
    path = Path(spec)
    if path.is_dir():
        files, seen = [], set()  # each file once, as a glob reads it (a link beside its file was read twice, h56)
        for p in sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in
                                                                               p.relative_to(path).parts)):
            if (real := os.path.realpath(p)) not in seen:
                seen.add(real)
                files.append(p)
        root = path
    elif path.is_file():
        files, root = [path], path.parent
    else:
        files, seen = [], set()  # each file once (a link to a folder above it: the glob walks it ~40 deep)
        for p in sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()):
            if (real := os.path.realpath(p)) not in seen:
                seen.add(real)
                files.append(p)
        root = Path(os.path.commonpath([str(p.parent) for p in files])) if files else Path(".")
    if not files:
        raise UsageError(f"{option}: expected a token file (*.bin), a folder, a glob or a text file; {spec!r} matches no file")
    return root, files


def _read_text(path: Path) -> tuple[bytes, str]:
    """``(bytes, "")`` of a text file, or ``(b"", why it is skipped)`` (one it cannot read: skipped, not a traceback)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        return b"", f"unreadable ({err.strerror or type(err).__name__})"
    if not data:
        return b"", "empty"
    if b"\0" in data[:8192]:
        return b"", "binary"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return b"", "not UTF-8"
    return data, ""


#: Bumped when the cache's layout changes (an old cache is then tokenized again).
CACHE_VERSION = 2
Index = list[tuple[str, int, int]]


def tokenize(files: list[Path], root: Path, cache: Path, option: str) -> tuple[np.ndarray, Index, list[tuple[str, str]]]:
    """Byte-tokenize ``files`` into ``cache`` once: ``(tokens, [(name, offset, length)], [(name, why skipped)])``.

    The cache file's name hashes the files' paths, sizes, modification and change times and inodes and the
    ``root`` they are named from, so a changed corpus is tokenized again; it is written to a temporary name and
    renamed, so an interrupted run never leaves a torn cache.
    """
    # the change time and inode too: an edit that keeps the size and sets the old modification time back (cp -p,
    # rsync -t, an unpacked tar) read the old text from the cache
    stats = [(str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
             for p in files for st in (p.stat(),)]
    # and the root the names are taken relative to: the same files read as --train base/c and as base/c/sub are
    # named sub/x.py and x.py (the cache gave the second run the first one's names, into the data's fingerprint)
    key = hashlib.sha256(json.dumps([CACHE_VERSION, str(root.resolve()), stats]).encode()).hexdigest()[:16]
    bin_path, idx_path = cache / f"bytes-{key}.bin", cache / f"bytes-{key}.json"
    if bin_path.is_file() and idx_path.is_file():
        saved = json.loads(idx_path.read_text())
        return (np.memmap(bin_path, dtype=np.uint8, mode="r"), [tuple(x) for x in saved["index"]],  # type: ignore[misc]
                [tuple(x) for x in saved["skipped"]])
    chunks, index, skipped, offset = [], [], [], 0
    for p in files:
        name = str(p.relative_to(root)) if p.is_relative_to(root) else str(p)
        name = name.encode("utf-8", "backslashreplace").decode("utf-8")  # (a latin-1 name: café as caf\udce9)
        data, why = _read_text(p)
        if why:
            skipped.append((name, why))
            continue
        chunks.append(np.frombuffer(data, dtype=np.uint8))
        index.append((name, offset, len(data)))
        offset += len(data)
    if not index:
        raise UsageError(f"{option}: expected UTF-8 text files; none of the {len(files)} files holds any "
                         f"({_reasons(skipped)})")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = bin_path.with_suffix(f".tmp{os.getpid()}")
    np.concatenate(chunks).tofile(tmp)
    os.replace(tmp, bin_path)
    tmp_idx = idx_path.with_suffix(f".tmp{os.getpid()}")
    tmp_idx.write_text(json.dumps({"index": index, "skipped": skipped}))
    os.replace(tmp_idx, idx_path)
    return np.memmap(bin_path, dtype=np.uint8, mode="r"), index, skipped


def _reasons(skipped: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> str:
    """``"2 empty, 1 not UTF-8"``."""
    counts: dict[str, int] = {}
    for _, why in skipped:
        counts[why] = counts.get(why, 0) + 1
    return ", ".join(f"{n} {why}" for why, n in sorted(counts.items()))


def chunk_files(tokens: np.ndarray, index: Index, skipped: list[tuple[str, str]], seq_len: int) -> Corpus:
    """Cut each file's tokens into whole chunks of ``seq_len`` (the tail shorter than that is dropped)."""
    starts, source = [], []
    for k, (_, offset, length) in enumerate(index):
        n = length // seq_len
        starts.append(offset + seq_len * np.arange(n, dtype=np.int64))
        source.append(np.full(n, k, dtype=np.int64))
    return Corpus(tokens, np.concatenate(starts), np.concatenate(source), tuple(n for n, _, _ in index), seq_len, True,
                  tuple(skipped))


def token_file(spec: str, dtype: str, seq_len: int, option: str) -> Corpus:
    """A flat token file as consecutive chunks of ``seq_len`` tokens, all from one source."""
    path = Path(spec)
    size = path.stat().st_size
    item = np.dtype(TOKEN_DTYPES[dtype]).itemsize
    if size == 0:
        raise UsageError(f"{option}: expected a non-empty token file; {spec!r} is empty")
    if size % item:
        raise UsageError(f"{option}: expected a flat {dtype} token file (size a multiple of {item} bytes, "
                         f"see --token-dtype); {spec!r} has {size} bytes")
    tokens = np.memmap(path, dtype=TOKEN_DTYPES[dtype], mode="r")
    n = len(tokens) // seq_len
    return Corpus(tokens, seq_len * np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int64), (path.name,), seq_len, False)


def load(spec: str, *, seq_len: int, cache: Path, option: str, token_dtype: str = "uint16") -> Corpus:
    """A corpus from ``spec`` (token file ``*.bin``, folder, glob or text file); see the module docstring."""
    if spec.endswith(".bin"):
        if not Path(spec).is_file():
            raise UsageError(f"{option}: expected an existing token file; {spec!r} "
                             + ("is a folder" if Path(spec).is_dir() else "does not exist"))
        corpus = token_file(spec, token_dtype, seq_len, option)
    else:
        root, files = text_files(spec, option)
        corpus = chunk_files(*tokenize(files, root, cache, option), seq_len=seq_len)
    if len(corpus) == 0:
        raise UsageError(f"{option}: expected at least one chunk of --seq-len {seq_len} tokens; {spec!r} holds fewer")
    return corpus


def load_stdlib(target: str, *, seq_len: int, cache: Path) -> tuple[Corpus, Corpus, Corpus]:
    """The embedded corpus: ``(train, val, test)`` (see the module docstring)."""
    root = stdlib_root()
    splits = []
    for name, files in zip(("--train", "--val", "--test"), stdlib_files(target), strict=True):
        splits.append(chunk_files(*tokenize(files, root, cache, name), seq_len=seq_len))
        if len(splits[-1]) == 0:
            raise UsageError(f"--seq-len: expected at most the length of the target's files; {seq_len} leaves {name} empty")
    return splits[0], splits[1], splits[2]


def evenly(corpus: Corpus, limit: int) -> Corpus:
    """At most ``limit`` chunks spread evenly over the corpus (all of them when ``limit`` is 0)."""
    if limit <= 0 or len(corpus) <= limit:
        return corpus
    return corpus.subset(np.unique(np.linspace(0, len(corpus) - 1, limit).round().astype(np.int64)))


def describe(corpus: Corpus) -> str:
    """``"N chunks of T tokens from S sources"``, and ``" (K files skipped: 2 empty, 1 not UTF-8)"`` when some were."""
    used, every = (len(np.unique(np.asarray(corpus.source))) if len(corpus) else 0), len(corpus.sources)
    some = f"{used:,} of {every:,}" if used < every else f"{every:,}"  # (a file shorter than a chunk gives none;
    text = (f"{len(corpus):,} chunk{'s' * (len(corpus) != 1)} of {corpus.seq_len} tokens from {some} "  # a limit
            f"source{'s' * (every != 1)}")  # on the chunks keeps some files' none)
    if corpus.skipped:
        n = len(corpus.skipped)
        text += f" ({n:,} file{'s' * (n != 1)} skipped: {_reasons(corpus.skipped)})"
    return text


def fingerprint(corpus: Corpus) -> dict[str, Any]:
    """What identifies the chunks a run sees: their count and a hash of their tokens, sources and source names.

    Reads every token of every chunk once (blocks of about 4M tokens): a changed,
    added or removed file, or a token file rewritten in place, changes it.
    """
    h = hashlib.sha256()
    h.update(json.dumps([corpus.seq_len, str(corpus.tokens.dtype), list(corpus.sources)]).encode())
    h.update(np.ascontiguousarray(corpus.source, dtype=np.int64).tobytes())
    step = max(1, (1 << 22) // corpus.seq_len)
    offsets = np.arange(corpus.seq_len, dtype=np.int64)
    for i in range(0, len(corpus), step):
        h.update(np.ascontiguousarray(corpus.tokens[corpus.starts[i:i + step, None] + offsets]).tobytes())
    return {"chunks": len(corpus), "sha256": h.hexdigest()}


#: The files a run writes under ``--out`` (and ``ghostfunc select``/``attribute`` under it), for :func:`would_read`.
RUN_FILES = ("config.json", "metrics.jsonl", "values.pt", "values.csv", "sources.csv", "report.md", "report.png",
             "trajectory/trajectory.pt", "trajectory/spec.json", "trajectory/unrolled.pt", "select/select.json",
             "select/select.md")


def _matches(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """``glob.glob(pattern, recursive=True)`` would list the path ``parts`` (hidden names need a literal dot)."""
    import fnmatch

    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return _matches(parts, rest) or (bool(parts) and not parts[0].startswith(".") and _matches(parts[1:], pattern))
    if not parts or (parts[0].startswith(".") and not head.startswith(".") and glob.has_magic(head)):
        return False
    return fnmatch.fnmatchcase(parts[0], head) and _matches(parts[1:], rest)


def would_read(spec: str, out: Path) -> bool:
    """A later read of the corpus ``spec`` (folder or glob) would take files the run writes into ``out``."""
    if spec in ("stdlib", "") or spec.endswith(".bin") or Path(spec).is_file():
        return False
    # as written and with symbolic links followed (an --out that is a link into the corpus, a corpus reached by one)
    outs = {Path(os.path.abspath(out)), Path(out).resolve()}
    if Path(spec).is_dir():
        for root in {Path(os.path.abspath(spec)), Path(spec).resolve()}:
            for out_abs in outs:
                if out_abs.is_relative_to(root) and not any(s.startswith(".")
                                                            for s in out_abs.relative_to(root).parts):
                    return True
        return False
    patterns = {Path(os.path.abspath(spec)).parts, Path(spec).resolve().parts}
    if any(_matches((out_abs / name).parts, pattern) for name in RUN_FILES for out_abs in outs
           for pattern in patterns):
        return True
    # and through a link inside the corpus (corpus/shared -> ../other with --out other/run and corpus/**/*: the run's
    # own files became training data, and every --resume, select and attribute was refused on the changed corpus,
    # h56): each folder the pattern's folder part reaches, named as the glob names it, where it leads
    heads = [h for h in {os.path.dirname(spec), *([spec] if os.path.basename(spec) == "**" else [])}
             if glob.has_magic(h)]  # (corpus/** lists the folders it walks too, h59)
    real_out = Path(out).resolve()
    for folder in (f for h in heads for f in glob.iglob(h, recursive=True)):
        real = Path(folder).resolve()
        if os.path.isdir(folder) and real_out.is_relative_to(real):
            written = Path(os.path.abspath(folder)) / real_out.relative_to(real)
            if any(_matches((written / name).parts, pattern) for name in RUN_FILES for pattern in patterns):
                return True
    return False


if __name__ == "__main__":  # pragma: no cover - a quick look at the embedded corpus
    tr, va, te = load_stdlib(sys.argv[1] if len(sys.argv) > 1 else "email", seq_len=128, cache=Path(".ghostfunc-cache"))
    print(describe(tr), describe(va), describe(te), sep="\n")
