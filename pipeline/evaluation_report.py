"""Evaluation results for people: summary rows, a text table, a CSV and an mIoU-vs-clicks plot."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .evaluation import SampleResult
from .files import write_bytes_atomic
from .metrics import Summary, summarize, timing


@dataclass(frozen=True)
class Row:
    """The summary of one run on one dataset."""

    run: str
    dataset: str
    summary: Summary


def unique_results(results: Iterable[SampleResult]) -> list[SampleResult]:
    """The first result of each (dataset, sample_id), in order: a sample recorded twice (two writers, an
    append repeated after a crash) counts once, and always with the same figures."""
    seen: set[tuple[str, str]] = set()
    out = []
    for r in results:
        if r.key not in seen:
            seen.add(r.key)
            out.append(r)
    return out


def summarize_run(run: str, results: Sequence[SampleResult], max_clicks: int) -> list[Row]:
    """One row per dataset of a run, datasets in order of first appearance; each sample counted once
    (`unique_results`)."""
    by_dataset: dict[str, list[SampleResult]] = {}
    for r in unique_results(results):
        by_dataset.setdefault(r.dataset, []).append(r)
    rows = []
    for name, rs in by_dataset.items():
        n_clicks = min(len(r.ious) for r in rs)
        if n_clicks < max_clicks:
            raise ValueError(f"run {run!r}, dataset {name}: a sample has {n_clicks} clicks, the summary needs {max_clicks}")
        protocols = {r.protocol for r in rs}
        if len(protocols) != 1:
            raise ValueError(f"run {run!r}, dataset {name}: samples of several protocols {sorted(protocols)}")
        timed = any(t is not None for r in rs for t in r.click_s)
        t = timing([r.encode_s for r in rs], [r.click_s for r in rs], [r.total_s for r in rs], [r.load_s for r in rs],
                   [r.ious for r in rs]) if timed else None
        rows.append(Row(run, name, summarize([r.ious for r in rs], t, max_clicks, protocols.pop())))
    return rows


HEADER = (
    "run", "dataset", "N", "NoC@85", "NoC@90", "NoF@85", "NoF@90", "SR@85", "SR@90",
    "mIoU@1", "mIoU@3", "mIoU@5", "enc s/img", "s/click", "SPC",
)


def table_cells(row: Row) -> list[str]:
    s = row.summary
    t = s.timing
    times = [f"{t.encode_s_per_image:.3f}", f"{t.interact_s_per_click:.3f}", f"{t.spc:.3f}"] if t else ["-"] * 3
    return [
        row.run, row.dataset, str(s.samples), f"{s.noc85:.2f}", f"{s.noc90:.2f}", str(s.nof85), str(s.nof90),
        f"{s.success85:.3f}", f"{s.success90:.3f}", *(f"{s.miou[k - 1]:.3f}" if len(s.miou) >= k else "-" for k in (1, 3, 5)), *times,
    ]


def format_table(rows: Sequence[Row], markdown: bool = False) -> str:
    """A fixed-width (or Markdown) table of the rows, with a legend of the column meanings."""
    cells = [list(HEADER)] + [table_cells(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "|".join("---" for _ in HEADER) + "|")
    else:
        widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
        lines = ["  ".join(v.rjust(w) if i > 1 else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths))) for c in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
    legend = (
        "NoF@t: samples whose NoC@t is the click cap (RITM's '>=20@t'; includes samples first reaching t at the last click); "
        "SR@t: InterFormer's success ratio (best IoU over all clicks >= t); "
        "enc s/img: encoder or feature read per image; s/click: add_click per click; "
        "SPC: RITM's seconds per click, its run stopped at IoU 0.90 (reading, encoding and model calls of the clicks "
        "made) / clicks made."
    )
    return "\n".join(lines) + "\n" + legend


def write_csv(results: Sequence[SampleResult], path: str | Path) -> None:
    """One row per sample (each once, `unique_results`) and click: dataset, sample_id, image_id, click, row,
    col, positive, iou, seconds. Floats are written as Python's repr (the shortest text that reads back as the
    same float), so NoC recomputed from the file is the summary's: a rounded IoU just under a threshold would
    read as reaching it. Written whole (pipeline.files); a file name that is not UTF-8 appears with its odd
    bytes as escapes (\\udcff), as in results.jsonl."""
    ordered = sorted(unique_results(results), key=lambda r: (r.dataset, r.sample_id))
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(["dataset", "sample_id", "image_id", "protocol", "click", "row", "col", "positive", "iou", "click_s"])
    for r in ordered:
        for k, (c, v, t) in enumerate(zip(r.clicks, r.ious, r.click_s), start=1):
            row, col, pos = c if c is not None else ("", "", "")
            sec = repr(float(t)) if t is not None else ""
            w.writerow([r.dataset, r.sample_id, r.image_id, r.protocol, k, row, col, pos, repr(float(v)), sec])
    write_bytes_atomic(path, f.getvalue().encode("utf-8", "backslashreplace"))


def plot_miou(rows: Sequence[Row], path: str | Path, title: str = "mIoU vs number of clicks") -> None:
    """PNG with one panel per dataset and one line per run (mIoU@k for k = 1..max_clicks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r.dataset for r in rows))
    runs = list(dict.fromkeys(r.run for r in rows))
    colours = {run: plt.get_cmap("tab10")(i % 10) for i, run in enumerate(runs)}
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], datasets):
        for r in rows:
            if r.dataset != name:
                continue
            curve = r.summary.miou
            ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, color=colours[r.run],
                    label=f"{r.run} (N={r.summary.samples})")
        ax.set_title(name)
        ax.legend(loc="lower right", fontsize=7)
        ax.set_xlabel("clicks")
        n = max(len(r.summary.miou) for r in rows if r.dataset == name)
        ax.set_xticks(sorted({1, n} | {k for k in (5, 10, 15, 20) if k <= n}))
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mIoU")
    fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(path, png.getvalue())
