"""What a ``ghostfunc train`` run found: ``values.csv``, ``sources.csv``, ``report.md``, ``report.png`` and a printed summary.

Sign convention of every file here: ``value = −Σφ``, the sum over the steps that
saw the chunk of its In-Run Data Shapley values with the sign flipped, so a
**positive value means the chunk lowered the validation (target) loss**.
``values.pt`` keeps the library's own ``φ`` (``DataValues.total[:, 0]``).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from .data import Corpus, describe
from .loop import write_atomic

TOP = 5


def source_table(train: Corpus, table: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per source: chunks, chunks seen, total value, mean value per seen chunk, mean loss; best total first."""
    seen = table["times_seen"] > 0
    n = len(train.sources)
    chunks = np.bincount(train.source, minlength=n)
    n_seen = np.bincount(train.source[seen], minlength=n)
    total = np.bincount(train.source[seen], weights=table["value"][seen], minlength=n)
    loss = np.bincount(train.source[seen], weights=table["mean_loss"][seen], minlength=n)
    rows = [{"source": train.sources[k], "chunks": int(chunks[k]), "chunks_seen": int(n_seen[k]),
             "value": float(total[k]), "value_per_chunk": float(total[k] / n_seen[k]),
             "mean_loss": float(loss[k] / n_seen[k])} for k in range(n) if n_seen[k]]
    return sorted(rows, key=lambda r: -r["value"])


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def chunk_rows(train: Corpus, table: dict[str, np.ndarray], order: int) -> list[dict[str, Any]]:
    """One row per chunk seen at least once, in chunk order."""
    rows = []
    for i in np.flatnonzero(table["times_seen"] > 0).tolist():
        row = {"chunk": i, "source": train.sources[train.source[i]], "value": float(table["value"][i])}
        if order == 2:
            row["value_first_order"] = float(table["value_first_order"][i])
        row.update(times_seen=int(table["times_seen"][i]), mean_loss=float(table["mean_loss"][i]))
        rows.append(row)
    return rows


def read_metrics(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.is_file() else []


def figure(path: Path, metrics: list[dict[str, Any]], sources: list[dict[str, Any]], rows: list[dict[str, Any]],
           target: str) -> None:
    """``report.png``: curves, value histogram, top/bottom sources, value distribution per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    for key, style in (("train_loss", "-"), ("val_loss", "o-"), ("test_loss", "s--")):
        pts = [(m["step"], m[key]) for m in metrics if key in m]
        if pts:
            ax[0, 0].plot(*zip(*pts, strict=True), style, label=key.replace("_", " "), ms=3)
    ax[0, 0].set(xlabel="step", ylabel="loss (nats/token)", title="training curves")
    ax[0, 0].legend()
    vals = np.array([r["value"] for r in rows])
    ax[0, 1].hist(vals, bins=60, color="tab:blue")
    ax[0, 1].axvline(0, color="k", lw=0.8)
    ax[0, 1].set(xlabel="value (−Σφ; > 0 lowered the target loss)", ylabel="chunks", yscale="log",
                 title=f"value of each seen chunk ({len(rows):,})")
    shown = sources[:8] + [s for s in sources[-8:] if s not in sources[:8]]
    ax[1, 0].barh([s["source"] for s in shown][::-1], [s["value"] for s in shown][::-1],
                  color=["tab:green" if s["value"] > 0 else "tab:red" for s in shown][::-1])
    ax[1, 0].set(xlabel="total value", title=f"sources ranked by total value for the target ({target})")
    ax[1, 0].tick_params(axis="y", labelsize=7)
    by_source: dict[str, list[float]] = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r["value"])
    box = [s["source"] for s in sources if len(by_source[s["source"]]) >= 5][:6]
    box += [s["source"] for s in sources[::-1] if len(by_source[s["source"]]) >= 5 and s["source"] not in box][:6]
    if box:
        ax[1, 1].boxplot([by_source[s] for s in box], showfliers=False, orientation="horizontal")
        ax[1, 1].set_yticks(range(1, len(box) + 1), box, fontsize=7)
    ax[1, 1].axvline(0, color="k", lw=0.8)
    ax[1, 1].set(xlabel="value per chunk", title="value per chunk: best and worst sources (>= 5 seen)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def _snippet(text: str, limit: int = 400) -> str:
    return text[:limit].replace("~~~", "~ ~ ~")


def write(out: Path, cfg: dict[str, Any], train: Corpus, table: dict[str, np.ndarray]) -> str:
    """Write ``values.csv``, ``sources.csv``, ``report.md``, ``report.png``; return the summary to print."""
    rows = chunk_rows(train, table, cfg["order"] if cfg["values"] == "shapley" else 1)
    sources = source_table(train, table)
    write_atomic(out / "values.csv", _csv(rows))
    write_atomic(out / "sources.csv", _csv(sources))
    metrics = read_metrics(out)
    target = cfg["target"] if cfg["train"] == "stdlib" else cfg["val"]
    last = metrics[-1] if metrics else {}
    first_eval: dict[str, Any] = next((m for m in metrics if "val_loss" in m), {})
    last_eval: dict[str, Any] = next((m for m in reversed(metrics) if "val_loss" in m), {})
    speed = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
    steps, evaluated = last.get("step", 0), last_eval.get("step", 0)
    # (a run stopped early, --stop-at, between evaluations: say so, and which step the last loss is from; h72)
    ran = f"{steps} steps" if steps >= cfg["steps"] else f"{steps} of {cfg['steps']} steps (stopped early)"
    at = f" (at step {evaluated})" if evaluated != steps else ""
    order = np.argsort(-table["value"])
    seen = order[table["times_seen"][order] > 0]
    lines = [f"# ghostfunc train: what the values found ({target})", "",
             f"Model `{cfg['model']}` ({cfg['size']}), {ran} of {cfg['batch_size']} chunks of "
             f"{cfg['seq_len']} tokens; values `{cfg['values']}` (order {cfg['order']}"
             f"{', preconditioned' if cfg['precondition'] else ''}) against the validation set `{target}`.",
             f"Training: {describe(train)}; {len(seen):,} seen at least once.",
             "",
             f"Validation loss {first_eval.get('val_loss', float('nan')):.3f} -> {last_eval.get('val_loss', float('nan')):.3f}{at}"
             + (f"; test loss {first_eval['test_loss']:.3f} -> {last_eval['test_loss']:.3f}" if "test_loss" in last_eval else "")
             + (f"; median {np.median(speed):,.0f} training tokens/s; {last.get('seconds', 0):.0f} s." if speed else "."),
             "",
             "`value` = −Σφ over the steps that saw the chunk: **positive = the chunk lowered the target loss**.",
             "", "![report](report.png)", "",
             "## Sources ranked by total value", "", "| rank | source | chunks seen | total value | per chunk | mean loss |",
             "|---:|---|---:|---:|---:|---:|"]
    ranked = [(k + 1, s) for k, s in enumerate(sources)]
    for k, s in ranked[:10] + ([(0, None)] if len(ranked) > 15 else []) + ranked[max(10, len(ranked) - 5):]:
        if s is None:
            lines.append("| ... | | | | | |")
            continue
        lines.append(f"| {k} | `{s['source']}` | {s['chunks_seen']} | {s['value']:.3g} | {s['value_per_chunk']:.3g} | "
                     f"{s['mean_loss']:.3f} |")
    few = min(TOP, (len(seen) + 1) // 2)  # (none listed both ways)
    for title, picks in (("Most helpful chunks", seen[:few]),
                         ("Lowest-valued chunks (harmful where negative)", seen[few:][::-1][:TOP])):
        if not len(picks):  # (one chunk seen: it is the most helpful, and there is no lowest apart from it)
            continue
        lines += ["", f"## {title}", ""]
        for i in picks.tolist():
            lines += [f"**chunk {i}** `{train.sources[train.source[i]]}`: value {table['value'][i]:.3g}, "
                      f"seen {int(table['times_seen'][i])}x, loss {table['mean_loss'][i]:.3f}", "", "~~~",
                      _snippet(train.text(i)), "~~~", ""]
    write_atomic(out / "report.md", "\n".join(lines) + "\n")
    if rows:
        figure(out / "report.png", metrics, sources, rows, target)
    k = min(5, (len(sources) + 1) // 2)  # (with fewer than 10 sources, none listed both ways, h102)
    top = ", ".join(f"{s['source']} ({s['value']:+.3g})" for s in sources[:k])
    bottom = ", ".join(f"{s['source']} ({s['value']:+.3g})" for s in sources[k:][::-1][:5])
    ranked_lines = [f"  most helpful sources for {target}: {top}"]
    if bottom:  # (one source: no lowest apart from it)
        ranked_lines.append(f"  lowest-valued sources (harmful where negative): {bottom}")
    if cfg["values"] != "shapley":  # trained without valuing: every value is 0, nothing to rank
        ranked_lines = ["  no values (--values none): the files hold the losses, every value is 0"]
    return "\n".join([
        f"ghostfunc train: {ran} in {last.get('seconds', 0):.0f} s, "
        f"validation loss {first_eval.get('val_loss', float('nan')):.3f} -> {last_eval.get('val_loss', float('nan')):.3f}{at} on "
        f"{target}",
        *ranked_lines,
        f"  wrote {out}/values.pt, metrics.jsonl, values.csv ({len(rows):,} chunks), sources.csv, report.md, report.png",
    ])
