"""The HTML report of a tracked run: ``gradkit report RUN_DIR [--out report.html]``.

One self-contained page (figures embedded as base64 PNG, no network) built
from ``RUN_DIR/tracking.jsonl``: the global norm with the clip threshold and
skipped steps, a per-layer norm heatmap, update/weight ratios with the 1e-3
guide line, the alerts, the noise scale with batch-size advice, and the bytes
sent per step. matplotlib is imported lazily (``pip install 'gradkit[viz]'``).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from gradkit.tracking.writers import JSONL_NAME, read_jsonl

__all__ = ["RunError", "load_run", "build_report", "SECTIONS"]

#: section ids of the page, in order (each but "alerts" holds one figure)
SECTIONS = ("global-norm", "layer-norms", "update-ratio", "alerts", "noise-scale", "compression")
UPDATE_GUIDE = 1e-3


class RunError(ValueError):
    """The directory holds no tracked run (no readable ``tracking.jsonl`` with steps)."""


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """(header, step records sorted by step, alerts) of the run in `run_dir`.

    A resumed run appends to the same log; a step logged twice keeps its latest record.

    Raises:
        RunError: no directory, no log, or a log without step records.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise RunError(f"{str(path)!r} is not a directory; pass the log_dir given to gk.Tracker")
    log = path / JSONL_NAME
    if not log.is_file():
        raise RunError(f"no run in {str(path)!r}: {JSONL_NAME} is missing; pass the log_dir of a gk.Tracker(log_dir, writers=('jsonl', ...)) run")
    records = read_jsonl(log)
    headers = [r for r in records if r.get("type") == "run"]
    steps = {r["step"]: r for r in records if r.get("type") == "step" and isinstance(r.get("step"), int)}
    if not steps:
        raise RunError(f"no logged steps in {str(log)!r}; train at least one optimizer step with the tracker attached")
    ordered = [steps[s] for s in sorted(steps)]
    alerts = [a for r in ordered for a in r.get("alerts", [])] + [r for r in records if r.get("type") == "alert"]
    return (headers[-1] if headers else {}), ordered, alerts


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of the run in `run_dir` (default ``run_dir/report.html``), atomically.

    Returns:
        The path written.

    Raises:
        RunError: no run in `run_dir`.
        ImportError: matplotlib is missing (``pip install 'gradkit[viz]'``).
    """
    header, steps, alerts = load_run(run_dir)
    plt = _pyplot()
    out = Path(out) if out is not None else Path(run_dir) / "report.html"
    sections = [
        ("global-norm", "Global gradient norm", _global_norm(plt, header, steps), ""),
        ("layer-norms", "Per-layer gradient norm", _heatmap(plt, steps), ""),
        ("update-ratio", "Update / weight ratio", _update_ratio(plt, steps), "||Δw|| / ||w|| per layer on logged steps; around 1e-3 (dashed) is the usual healthy order of magnitude."),
        ("alerts", f"Alerts ({len(alerts)})", None, _alerts_table(alerts)),
        ("noise-scale", "Gradient noise scale", _noise(plt, steps), _advice(steps)),
        ("compression", "Communication", _bytes(plt, steps), _bytes_note(steps)),
    ]
    body = []
    for sid, title, figure, text in sections:
        img = f'<img alt="{html.escape(title)}" src="data:image/png;base64,{figure}">' if figure else ""
        body.append(f'<section id="{sid}"><h2>{html.escape(title)}</h2>{text}{img}</section>')
    meta = header.get("meta") or {}
    summary = (
        f"{len(steps)} logged steps (1 to {steps[-1]['step']}), every {header.get('every', '?')}; "
        f"{len(header.get('modules', steps[-1]['modules']))} layers; gradkit {html.escape(str(header.get('version', '?')))}"
        + (f"; settings: {html.escape(', '.join(f'{k}={v}' for k, v in meta.items()))}" if meta else "")
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gradkit report: {html.escape(str(run_dir))}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
section {{ margin-bottom: 2.5em; }} img {{ max-width: 100%; }}
table {{ border-collapse: collapse; font-size: 0.9em; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }}
.note {{ color: #555; }}
</style></head><body>
<h1>Gradient report</h1><p class="note">{html.escape(str(Path(run_dir).resolve()))}: {summary}</p>
{"".join(body)}
</body></html>
"""
    _write_atomic(out, page)
    return out


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("gradkit report needs matplotlib: pip install 'gradkit[viz]' (or pip install matplotlib)") from error
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _png(plt, fig) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _global_norm(plt, header: dict, steps: list[dict]) -> str:
    x = [r["step"] for r in steps]
    fig, ax = plt.subplots(figsize=(11, 3.6))
    ax.plot(x, [_num(r["global"]["norm_pre_clip"]) for r in steps], label="before clipping", color="tab:blue")
    ax.plot(x, [_num(r["global"]["norm"]) for r in steps], label="after clipping", color="tab:green", linestyle="--")
    threshold, source = _clip_threshold(header, steps)
    if threshold is not None:
        ax.axhline(threshold, color="tab:orange", linestyle=":", label=f"clip threshold {threshold:.3g} ({source})")
    skipped = [r["step"] for r in steps if r["global"]["skipped"] or r["global"]["skipped_steps"]]
    if skipped:
        for s in skipped:
            ax.axvline(s, color="tab:red", alpha=0.4)
        ax.plot([], [], color="tab:red", alpha=0.4, label=f"skipped steps since the previous log ({len(skipped)} logs)")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
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


def _heatmap(plt, steps: list[dict]) -> str:
    import numpy as np

    layers = list(dict.fromkeys(name for r in steps for name in r["modules"]))
    grid = np.full((len(layers), len(steps)), np.nan)
    for j, r in enumerate(steps):
        for i, name in enumerate(layers):
            value = _num(r["modules"].get(name, {}).get("norm_pre_clip"))
            if value > 0 and math.isfinite(value):
                grid[i, j] = math.log10(value)
    fig, ax = plt.subplots(figsize=(11, max(2.5, 0.28 * len(layers) + 1.2)))
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(layers)), labels=layers, fontsize=7 if len(layers) > 20 else 9)
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int)
    ax.set_xticks(ticks, labels=[steps[t]["step"] for t in ticks])
    ax.set_xlabel("optimizer step (logged)")
    fig.colorbar(image, ax=ax, label="log10 gradient norm (before clipping)")
    return _png(plt, fig)


def _update_ratio(plt, steps: list[dict]) -> str:
    layers = list(dict.fromkeys(name for r in steps for name in r["modules"]))
    fig, ax = plt.subplots(figsize=(11, 3.8))
    cmap = plt.get_cmap("viridis")
    for i, name in enumerate(layers):
        points = [(r["step"], _num(r["modules"].get(name, {}).get("update_to_weight"))) for r in steps]
        points = [(s, v) for s, v in points if v > 0 and math.isfinite(v)]
        if points:
            ax.plot(*zip(*points), label=name, color=cmap(i / max(len(layers) - 1, 1)), marker="." if len(points) < 30 else None)
    ax.axhline(UPDATE_GUIDE, color="black", linestyle="--", label="1e-3 guide")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("||Δw|| / ||w||")
    if len(layers) <= 12:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    ax.grid(alpha=0.3)
    return _png(plt, fig)


def _noise(plt, steps: list[dict]) -> str:
    points = [(r["step"], _num(r["noise"]["b_simple"]), _num(r["noise"]["big_batch"])) for r in steps if r.get("noise")]
    fig, ax = plt.subplots(figsize=(11, 3.2))
    shown = [(s, b, big) for s, b, big in points if math.isfinite(b)]
    if shown:
        ax.plot([p[0] for p in shown], [p[1] for p in shown], label="B_simple (EMA)", color="tab:purple")
        ax.plot([p[0] for p in points], [p[2] for p in points], label="current batch", color="gray", linestyle="--")
        ax.set_yscale("log")
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "not measured: needs accumulation_steps > 1 or several processes", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("batch size (items)")
    ax.grid(alpha=0.3)
    return _png(plt, fig)


def _advice(steps: list[dict]) -> str:
    for r in reversed(steps):
        if r.get("noise") and r["noise"].get("advice"):
            return f'<p>At step {r["step"]}: {html.escape(r["noise"]["advice"])}. B_simple (McCandlish et al. 2018) is a noisy proxy of the critical batch size and grows as the loss falls.</p>'
    return '<p class="note">No noise-scale estimate yet.</p>'


def _bytes(plt, steps: list[dict]) -> str:
    fig, ax = plt.subplots(figsize=(11, 3.0))
    ax.plot([r["step"] for r in steps], [r["global"]["bytes_sent"] for r in steps], marker=".", color="tab:cyan", label="bytes sent (this rank)")
    ratios = [(r["step"], r["global"]["compression_ratio"]) for r in steps if r["global"].get("compression_ratio")]
    if ratios:
        twin = ax.twinx()
        twin.plot(*zip(*ratios), color="tab:red", label="compression ratio")
        twin.set_ylabel("dense / sent")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("bytes per step")
    ax.grid(alpha=0.3)
    return _png(plt, fig)


def _bytes_note(steps: list[dict]) -> str:
    total = sum(r["global"]["bytes_since_log"] for r in steps)
    if not total:
        return '<p class="note">Nothing was sent: one process, or averaging left to DDP.</p>'
    return f"<p>{total / 2**20:.1f} MiB sent by this rank over the logged windows.</p>"


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
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
