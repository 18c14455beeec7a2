"""The HTML report of a tracked run: ``gradkit report RUN_DIR [--out report.html]``.

One self-contained page (figures embedded as base64 PNG, no network) built
from ``RUN_DIR/tracking.jsonl``: the global norm with the clip threshold and
skipped steps, a per-layer norm heatmap, update/weight ratios with the 1e-3
guide line, the alerts, the noise scale with batch-size advice, and the bytes
sent per step. A section without data (no noise-scale estimate, nothing sent)
says so in a sentence instead of drawing an empty plot. Bytes are in SI units
(1 MB = 10**6 bytes), as in the rest of gradkit's output. matplotlib is
imported lazily (``pip install 'gradkit[viz]'``).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

from gradkit._units import against_dense, si_bytes
from gradkit.tracking.writers import JSONL_NAME, read_jsonl

__all__ = ["RunError", "load_run", "build_report", "SECTIONS"]

#: section ids of the page, in order ("alerts" is a table; the others a figure, or a sentence when there is no data)
SECTIONS = ("global-norm", "layer-norms", "update-ratio", "alerts", "noise-scale", "compression")
UPDATE_GUIDE = 1e-3
#: layers drawn in colour, with a legend, on the update/weight plot; the others are grey
HIGHLIGHTED = 5
#: fewer points than this get markers, so that a short run still shows its data
MARKERS_BELOW = 30


class RunError(ValueError):
    """The directory holds no tracked run (no readable ``tracking.jsonl`` with steps)."""


def load_run(
    run_dir: str | Path, *, skipped: list[int] | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """(header, step records sorted by step, alerts) of the run in `run_dir`.

    A resumed run appends to the same log; a step logged twice keeps its latest record. A run started afresh in
    an old log (its steps start over at 1: a script run again, a trainer's second training) is the one read, from
    its run header on, with a RuntimeWarning that names the earlier run's last step (the two runs' records would
    otherwise mix, one step's record from each).
    Unreadable lines (a run stopped mid-write) are skipped with a UserWarning each; `skipped`, if given, has
    their line numbers appended (also when this raises).

    Raises:
        RunError: no directory, no log, or a log without step records.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise RunError(f"{str(path)!r} is not a directory; pass the log_dir given to gk.Tracker")
    log = path / JSONL_NAME
    if not log.is_file():
        raise RunError(
            f"no run in {str(path)!r}: {JSONL_NAME} is missing; pass the log_dir of a gk.Tracker(log_dir, "
            "writers=('jsonl', ...)) run"
        )
    records = read_jsonl(log, skipped=skipped)
    restarted, start = _latest_run(records)
    if restarted:  # RuntimeWarning: not an unreadable line (the page counts those, UserWarning)
        records = records[start:]
        warnings.warn(
            f"{str(log)!r}: the steps start over at step 1 after step {restarted}: the log holds a run that started "
            "afresh in the same log_dir (a script run again, or a trainer's next training); only the latest run, "
            "from its run header on, is read; give each run its own log_dir to keep every run's report",
            RuntimeWarning,
            stacklevel=2,
        )
    headers = [r for r in records if r.get("type") == "run"]
    steps = {r["step"]: r for r in records if r.get("type") == "step" and isinstance(r.get("step"), int)}
    if not steps:
        raise RunError(f"no logged steps in {str(log)!r}; train at least one optimizer step with the tracker attached")
    ordered = [steps[s] for s in sorted(steps)]
    alerts = [a for r in ordered for a in r.get("alerts", [])] + [r for r in records if r.get("type") == "alert"]
    # A replay's alert (locate_nonfinite) is its own line, written when it ran: list it among the steps' alerts.
    alerts.sort(key=lambda a: a.get("step") if isinstance(a.get("step"), int) else math.inf)
    return (headers[-1] if headers else {}), ordered, alerts


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of the run in `run_dir` (default ``run_dir/report.html``), atomically.

    Returns:
        The path written.

    Raises:
        RunError: no run in `run_dir`.
        ImportError: matplotlib is missing (``pip install 'gradkit[viz]'``).
    """
    skipped: list[int] = []  # the unreadable lines' numbers (each also a warning, for the command line)
    header, steps, alerts = load_run(run_dir, skipped=skipped)
    plt = _pyplot()
    out = Path(out) if out is not None else Path(run_dir) / "report.html"
    with warnings.catch_warnings(record=True) as drawn:
        warnings.simplefilter("always")
        sections = _sections(plt, header, steps, alerts)
    _pass_on(drawn)
    body = []
    for sid, title, figure, text in sections:
        img = f'<img alt="{html.escape(title)} plot" src="data:image/png;base64,{figure}">' if figure else ""
        body.append(f'<section id="{sid}"><h2>{html.escape(title)}</h2>{text}{img}</section>')
    meta = header.get("meta") or {}
    layers = len(header.get("modules", steps[-1]["modules"]))
    unread = len(skipped)
    summary = (
        f"{_plural(len(steps), 'logged step')} ({steps[0]['step']} to {steps[-1]['step']}), "
        f"every {header.get('every', '?')}; {_plural(layers, 'layer')}; gradkit "
        f"{html.escape(str(header.get('version', '?')))}"
        + (f"; settings: {html.escape(', '.join(f'{k}={v}' for k, v in meta.items()))}" if meta else "")
        + (f"; {_plural(unread, 'unreadable line')} of the log skipped (a run stopped while writing)" if unread else "")
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gradkit report: {html.escape(str(run_dir))}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
section {{ margin-bottom: 2.5em; }} img {{ max-width: 100%; }}
table {{ border-collapse: collapse; font-size: 0.9em; }} \
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }}
.note {{ color: #555; }}
</style></head><body>
<h1>Gradient report</h1><p class="note">{html.escape(str(Path(run_dir).resolve()))}: {summary}</p>
{"".join(body)}
</body></html>
"""
    _write_atomic(out, page)
    return out


def _sections(plt, header: dict, steps: list[dict], alerts: list[dict]) -> list[tuple[str, str, str | None, str]]:
    """(id, title, figure as base64 PNG or None, text) of each section, in `SECTIONS` order."""
    return [
        ("global-norm", "Global gradient norm", _global_norm(plt, header, steps), ""),
        ("layer-norms", "Per-layer gradient norm", _heatmap(plt, steps), _heatmap_note(steps)),
        ("update-ratio", "Update / weight ratio", _update_ratio(plt, steps), _update_note(steps)),
        ("alerts", f"Alerts ({len(alerts)})", None, _alerts_table(alerts)),
        ("noise-scale", "Gradient noise scale", _noise(plt, steps), _advice(steps)),
        ("compression", "Communication", _bytes(plt, steps), _bytes_note(steps)),
    ]


def _pass_on(caught: list) -> None:
    """Warn again what drawing warned; the font's missing glyphs once (matplotlib warns per glyph and figure)."""
    glyphs: dict[str, None] = {}
    font = ""
    for warning in caught:
        missing = _GLYPH.match(str(warning.message))
        if missing:
            glyphs[chr(int(missing.group(1)))] = None
            font = missing.group(2)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if glyphs:
        warnings.warn(
            f"the plots' font ({font}) has no {''.join(glyphs)!r} of the layer names: those characters show as "
            "boxes in the figures (the alerts table keeps them); to draw them, list a font that has them after "
            "the default in a matplotlibrc, e.g. font.family: DejaVu Sans, Noto Sans CJK JP",
            stacklevel=3,
        )


def _latest_run(records: list[dict[str, Any]]) -> tuple[int | None, int]:
    """Where the latest run started afresh in an old log: (the last step logged before it, the index of its run
    header), or (None, 0) if no run did. A run started afresh is a run header whose first step is 1; a resumed
    run goes on from its checkpoint's step, so its steps do not start over and its records stay with the run's."""
    restarted, start = None, 0
    highest, header = 0, None
    for index, record in enumerate(records):
        if record.get("type") == "run":
            header = index if header is None else header  # the first header of a run (a resume may add more)
        elif record.get("type") == "step" and isinstance(record.get("step"), int):
            if header is not None and record["step"] == 1 and highest > 1:
                restarted, start, highest = highest, header, 0
            header, highest = None, max(highest, record["step"])
    return restarted, start


_GLYPH = re.compile(r"Glyph (\d+) .*missing from (?:current )?font\(s\) (.*?)\.?$")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "gradkit report needs matplotlib: pip install 'gradkit[viz]' (or pip install matplotlib)"
        ) from error
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _png(plt, fig) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")  # tight: long axis labels are never cut
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _marker(count: int) -> str | None:
    return "o" if count < MARKERS_BELOW else None


def _step_axis(ax, x: list[int]) -> None:
    """Whole-number step ticks; a single logged step gets a step either side instead of a ±4% sliver."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if x and min(x) == max(x):
        ax.set_xlim(x[0] - 1, x[0] + 1)
    ax.set_xlabel("optimizer step")


def _global_norm(plt, header: dict, steps: list[dict]) -> str:
    x = [r["step"] for r in steps]
    fig, ax = plt.subplots(figsize=(11, 3.6))
    marker = _marker(len(x))
    before = [_num(r["global"]["norm_pre_clip"]) for r in steps]
    ax.plot(x, before, label="before clipping", color="tab:blue", marker=marker)
    after = [_num(r["global"]["norm"]) for r in steps]
    ax.plot(x, after, label="after clipping", color="tab:green", linestyle="--", marker=marker, markersize=4)
    threshold, source = _clip_threshold(header, steps)
    if threshold is not None:
        ax.axhline(threshold, color="tab:orange", linestyle=":", label=f"clip threshold {threshold:.3g} ({source})")
    skipped = [r["step"] for r in steps if r["global"]["skipped"] or r["global"]["skipped_steps"]]
    if skipped:
        for s in skipped:
            ax.axvline(s, color="tab:red", alpha=0.4)
        ax.plot([], [], color="tab:red", alpha=0.4, label=f"skipped steps since the previous log ({len(skipped)} logs)")
    ax.set_yscale("log")
    ax.margins(y=0.15)  # a point on the frame reads as cut off
    _step_axis(ax, x)
    ax.set_ylabel("global L2 norm")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return _png(plt, fig)


def _clip_threshold(header: dict, steps: list[dict]) -> tuple[float | None, str]:
    meta = header.get("meta") or {}
    if isinstance(meta.get("max_norm"), (int, float)):
        return float(meta["max_norm"]), "from the run settings"
    # A global-norm clip leaves the norm at the threshold on clipped steps.
    clipped = sorted(_num(r["global"]["norm"]) for r in steps if _num(r["global"]["clip_coef"]) < 1 - 1e-6)
    clipped = [c for c in clipped if math.isfinite(c)]
    if clipped:
        return clipped[len(clipped) // 2], "inferred from clipped steps"
    return None, ""


def _norm_grid(steps: list[dict]) -> tuple[list[str], Any]:
    """The layers and their log10 norms before clipping, (layers, steps); NaN where none can be drawn (non-finite,
    zero, or the layer absent from that step)."""
    import numpy as np

    layers = list(dict.fromkeys(name for r in steps for name in r["modules"]))
    grid = np.full((len(layers), len(steps)), np.nan)
    for j, r in enumerate(steps):
        for i, name in enumerate(layers):
            value = _num(r["modules"].get(name, {}).get("norm_pre_clip"))
            if value > 0 and math.isfinite(value):
                grid[i, j] = math.log10(value)
    return layers, grid


def _heatmap(plt, steps: list[dict]) -> str:
    import numpy as np

    layers, grid = _norm_grid(steps)
    fig, ax = plt.subplots(figsize=(11, max(2.5, 0.28 * len(layers) + 1.2)))
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(layers)), labels=layers, fontsize=7 if len(layers) > 20 else 9)
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int)
    ax.set_xticks(ticks, labels=[steps[t]["step"] for t in ticks])
    ax.set_xlabel("optimizer step (logged)")
    fig.colorbar(image, ax=ax, label="log10 norm, before clipping")
    return _png(plt, fig)


def _heatmap_note(steps: list[dict]) -> str:
    """Says what a blank cell is, when the heatmap has one (else nothing)."""
    import numpy as np

    if not np.isnan(_norm_grid(steps)[1]).any():
        return ""
    return (
        '<p class="note">A blank cell is a norm that cannot be drawn on a log scale: non-finite (null in the log; '
        "see the alerts), exactly zero, or a layer absent from that step.</p>"
    )


def _update_ratio(plt, steps: list[dict]) -> str | None:
    import numpy as np

    layers = list(dict.fromkeys(name for r in steps for name in r["modules"]))
    series = {}
    for name in layers:
        points = [(r["step"], _num(r["modules"].get(name, {}).get("update_to_weight"))) for r in steps]
        points = [(s, v) for s, v in points if v > 0 and math.isfinite(v)]
        if points:
            series[name] = points
    if not series:
        return None
    # The layers that move most (largest mean log ratio) are the ones to watch: colour and legend for
    # them, grey for the rest, so that a model with dozens of layers stays readable.
    ranked = sorted(series, key=lambda n: -float(np.mean([math.log10(v) for _, v in series[n]])))
    top = ranked[:HIGHLIGHTED]
    fig, ax = plt.subplots(figsize=(11, 3.8))
    marker = _marker(max(len(p) for p in series.values()))
    rest = [n for n in layers if n in series and n not in top]
    for i, name in enumerate(rest):
        ax.plot(*zip(*series[name]), color="0.75", linewidth=0.8, marker=marker, markersize=3,
                label=f"other {len(rest)} layers" if i == 0 else None)  # fmt: skip
    colors = plt.get_cmap("tab10")
    for i, name in enumerate(top):
        ax.plot(*zip(*series[name]), color=colors(i), linewidth=1.6, marker=marker, markersize=4, label=name)
    ax.axhline(UPDATE_GUIDE, color="black", linestyle="--", label="1e-3 guide")
    ax.set_yscale("log")
    _step_axis(ax, [r["step"] for r in steps])
    ax.set_ylabel("||Δw|| / ||w||")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    ax.grid(alpha=0.3)
    return _png(plt, fig)


def _update_note(steps: list[dict]) -> str:
    layers = {name for r in steps for name in r["modules"]}
    if len(layers) > HIGHLIGHTED:
        grey = len(layers) - HIGHLIGHTED
        which = f"the {HIGHLIGHTED} layers with the largest ratios in colour, the other {grey} in grey"
    else:
        which = "one line per layer"
    return (
        f"<p>||Δw|| / ||w|| per layer on logged steps ({which}); around 1e-3 (dashed) is the usual healthy order "
        "of magnitude.</p>"
    )


def _noise(plt, steps: list[dict]) -> str | None:
    # A non-positive estimate is the EMA still settling (the advice says nothing then): not a point to draw.
    rows = [r for r in steps if r.get("noise") and 0 < _num(r["noise"].get("b_simple")) < math.inf]
    if not rows:
        return None
    x = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(11, 3.2))
    marker = _marker(len(x))
    ax.plot(x, [_num(r["noise"]["b_simple"]) for r in rows], label="B_simple (EMA)", color="tab:purple", marker=marker)
    ax.plot(x, [_step_batch(r) for r in rows], label="current batch (items per step, all workers)", color="gray",
            linestyle="--", marker=marker, markersize=3)  # fmt: skip
    ax.set_yscale("log")
    ax.legend(loc="best", fontsize=8)
    _step_axis(ax, x)
    ax.set_ylabel("batch size (items)")
    ax.grid(alpha=0.3)
    return _png(plt, fig)


def _step_batch(record: dict) -> float:
    """The batch the advice compares with B_simple: the step's items over all workers (else the measured big batch)."""
    for value in (_num(record["global"].get("items")), _num(record["noise"].get("big_batch"))):
        if math.isfinite(value) and value > 0:
            return value
    return math.nan


def _advice(steps: list[dict]) -> str:
    for r in reversed(steps):
        if r.get("noise") and r["noise"].get("advice"):
            return (
                f"<p>At step {r['step']}: {html.escape(r['noise']['advice'])}. B_simple (McCandlish et al. 2018) "
                "is a noisy proxy of the critical batch size and grows as the loss falls.</p>"
            )
    return (
        '<p class="note">No noise-scale estimate: it needs two batch sizes per step, so accumulation_steps > 1 '
        "or several workers, and a few logged steps.</p>"
    )


def _bytes(plt, steps: list[dict]) -> str | None:
    if not any(r["global"]["bytes_sent"] for r in steps):
        return None
    x = [r["step"] for r in steps]
    marker = _marker(len(x))
    fig, ax = plt.subplots(figsize=(11, 3.0))
    sent_mb = [r["global"]["bytes_sent"] / 1e6 for r in steps]
    ax.plot(x, sent_mb, marker=marker, color="tab:cyan", label="sent by this worker")
    dense_mb = [_num(r["global"].get("dense_bytes")) / 1e6 for r in steps]
    ax.plot(x, dense_mb, color="gray", linestyle="--", label="dense gradient")
    dense = [_num(r["global"].get("dense_bytes")) for r in steps]
    sent = [r["global"]["bytes_sent"] for r in steps if r["global"]["bytes_sent"] > 0]
    if sent and any(math.isfinite(d) and d > 10 * min(sent) for d in dense):
        ax.set_yscale("log")  # a 30x saving is unreadable on a linear axis; on a log one the gap is the ratio
        ax.set_ylabel("MB per step (log scale)")
    else:
        top = max([v for v in sent_mb + dense_mb if math.isfinite(v)], default=0.0)
        # From zero, so that a steady count is not drawn as a big swing; with headroom, so that a constant
        # line (nothing compressed: sent = dense) is not drawn on the frame.
        ax.set_ylim(0, top * 1.15 or 1.0)
        ax.set_ylabel("MB per step")
    _step_axis(ax, x)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    ax.grid(alpha=0.3)
    return _png(plt, fig)


def _bytes_note(steps: list[dict]) -> str:
    total = sum(r["global"]["bytes_since_log"] for r in steps)
    if not total:
        return '<p class="note">Nothing was sent: one process, or averaging left to DDP.</p>'
    ratios = [_num(r["global"].get("compression_ratio")) for r in steps]
    ratios = [v for v in ratios if math.isfinite(v) and v > 0]
    ratio = f"; the last logged step sent {against_dense(ratios[-1])}" if ratios else ""
    return (
        f"<p>{si_bytes(total)} (SI units: 1 MB = 10<sup>6</sup> bytes) sent by this worker over the logged "
        f"windows{ratio}.</p>"
    )


def _alerts_table(alerts: list[dict]) -> str:
    if not alerts:
        return '<p class="note">No alerts: no vanishing, exploding, dead or non-finite gradients were seen.</p>'
    rows = "".join(
        f"<tr><td>{a.get('step')}</td><td>{html.escape(str(a.get('kind')))}</td><td>{html.escape(str(a.get('name')))}</td><td>{html.escape(str(a.get('message')))}</td></tr>"
        for a in alerts
    )
    return f"<table><tr><th>step</th><th>kind</th><th>layer</th><th>message</th></tr>{rows}</table>"


def _write_atomic(path: Path, text: str) -> None:
    # Write a temporary file next to the target and rename it: a crash never leaves half a page.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the page gets the mode of the other outputs
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it; put it straight back
    os.umask(mask)
    return mask
