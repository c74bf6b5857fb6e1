"""Compare smoke reports across cards: one self-contained HTML page with SVG plots.

Loss curves, throughput and step time per card, like the seed article's Machine 1 vs
Machine 2 figure. No plotting library: plain SVG, so the page opens anywhere offline.
"""

from __future__ import annotations

import html
import math
import json
from pathlib import Path

from . import inputs
from .errors import BadInput

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def load(paths) -> list[dict]:
    reports = []
    for path in paths:
        try:
            data = json.loads(inputs.read_text(path, "smoke report", "pass the files envbuild smoke --report wrote"))
            train = ((data.get("levels") or {}).get("train") or {}).get("runs", {}).get("synthetic")
            passed = isinstance(train, dict) and train.get("status") == "passed"
            losses = [float(v) for v in train["losses"]] if passed else None
            numbers = (losses or []) + ([float(train["samples_per_s"]), float(train["step_time_s"])] if passed else [])
            if not all(math.isfinite(v) for v in numbers):  # NaN or inf would be drawn as a line to nowhere
                raise BadInput(f"{path}: its train run has a loss, throughput or step time that is not a finite "
                               "number (NaN or inf)", "a diverged run cannot be compared: run envbuild smoke again")
            if passed:  # the numbers the page plots, as numbers
                train = dict(train, losses=losses, samples_per_s=float(train["samples_per_s"]),
                             step_time_s=float(train["step_time_s"]))
            gpus = (data.get("environment") or {}).get("gpus") or []
        except (OSError, ValueError, RecursionError) as exc:
            raise BadInput(f"cannot read smoke report {path}: {exc}",
                           "pass the files envbuild smoke --report wrote") from None
        except (AttributeError, TypeError, KeyError):  # JSON, but not shaped like a smoke report
            raise BadInput(f"{path} is not a smoke report", "pass the files envbuild smoke --report wrote") from None
        if not losses:
            raise BadInput(f"{path} has no passed synthetic train run to compare",
                           "run envbuild smoke IMAGE --level train --report FILE first")
        data["_label"] = f"{data.get('card_name', data.get('card'))} ({gpus[0] if gpus else train.get('device')})"
        data["_train"] = train
        data["_path"] = str(path)
        reports.append(data)
    if not reports:
        raise BadInput("no reports given", "envbuild compare A.json B.json")
    return reports


def _line_chart(series, title, ylabel, width=640, height=300, pad=48) -> str:
    xs = [len(s["values"]) for s in series]
    ys = [v for s in series for v in s["values"]]
    xmax, ymin, ymax = max(xs) - 1 or 1, min(ys), max(ys)
    if ymax == ymin:
        ymax = ymin + 1
    px = lambda i: pad + (width - 2 * pad) * i / xmax  # noqa: E731
    py = lambda v: height - pad - (height - 2 * pad) * (v - ymin) / (ymax - ymin)  # noqa: E731
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{width / 2}" y="18" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#333"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#333"/>',
             f'<text x="{pad - 6}" y="{py(ymax) + 4}" text-anchor="end" font-size="11">{ymax:.3g}</text>',
             f'<text x="{pad - 6}" y="{py(ymin) + 4}" text-anchor="end" font-size="11">{ymin:.3g}</text>',
             f'<text x="{width - pad}" y="{height - pad + 16}" text-anchor="end" font-size="11">step {xmax}</text>',
             f'<text x="12" y="{height / 2}" font-size="11" transform="rotate(-90 12 {height / 2})">{html.escape(ylabel)}</text>']
    for i, s in enumerate(series):
        pts = " ".join(f"{px(j):.1f},{py(v):.1f}" for j, v in enumerate(s["values"]))
        color = COLORS[i % len(COLORS)]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>')
        parts.append(f'<text x="{width - pad + 4}" y="{pad + 14 * i}" font-size="11" fill="{color}">{html.escape(s["label"])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _bar_chart(items, title, unit, width=640, pad=48, bar=26) -> str:
    height = pad + len(items) * (bar + 10) + 10
    vmax = max(v for _, v in items) or 1
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{width / 2}" y="18" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>']
    for i, (label, value) in enumerate(items):
        y = pad + i * (bar + 10)
        w = (width - 2 * pad - 160) * value / vmax
        color = COLORS[i % len(COLORS)]
        parts.append(f'<text x="4" y="{y + bar * 0.7}" font-size="11">{html.escape(label[:28])}</text>')
        parts.append(f'<rect x="170" y="{y}" width="{w:.1f}" height="{bar}" fill="{color}"/>')
        parts.append(f'<text x="{174 + w:.1f}" y="{y + bar * 0.7}" font-size="11">{value:.4g} {html.escape(unit)}</text>')
    parts.append("</svg>")
    return "".join(parts)


GENERATOR = '<meta name="generator" content="envbuild compare">'  # how a page envbuild wrote is recognised
HEAD = '<!doctype html>\n<html><head><meta charset="utf-8">' + GENERATOR


def made_by_envbuild(text: str) -> bool:
    """A page envbuild wrote starts with its own head; a page that only mentions the generator is a user's."""
    return text.startswith(HEAD)


def page(reports: list[dict]) -> str:
    losses = [{"label": r["_label"], "values": r["_train"]["losses"]} for r in reports]
    rows = []
    for r in reports:
        t = r["_train"]
        io = (r.get("levels") or {}).get("io") or {}
        comm = (r.get("levels") or {}).get("comm") or {}
        bus = next((a.get("bus_GBps") for a in comm.get("attempts", []) if a.get("ok")), None)
        compiled = (((r.get("levels") or {}).get("train") or {}).get("runs") or {}).get("synthetic_compiled") or {}
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
            r["_label"], r.get("model"), (r.get("environment") or {}).get("torch"), t.get("device"),
            t.get("step_time_s"), t.get("samples_per_s"), t.get("data_wait_share"), t.get("peak_gpu_mem_mb", "-"),
            f"{t['first_loss']:.4f} -> {t['last_loss']:.4f}", io.get("write_MBps", "-"), io.get("read_MBps", "-"),
            f"{bus} ({comm.get('works_with')})" if bus is not None else comm.get("status", "-"),
            f"{compiled['speedup_vs_eager']}x" if "speedup_vs_eager" in compiled else compiled.get("status", "-"),
            "ok" if r.get("ok") else "FAILED")) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("machine", "model", "torch", "device", "step s", "samples/s",
                                             "data wait", "peak GPU MB", "loss", "ckpt write MB/s",
                                             "ckpt read MB/s", "all-reduce GB/s", "torch.compile", "smoke"))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta name="generator" content="envbuild compare"><title>envbuild: card vs card</title>
<style>body{{font-family:sans-serif;margin:24px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}</style></head>
<body><h1>envbuild smoke: card vs card</h1>
<p>{len(reports)} report(s): {html.escape(", ".join(r["_path"] for r in reports))}</p>
<table><tr>{head}</tr>{"".join(rows)}</table>
{_line_chart(losses, "training loss (synthetic perception net)", "loss")}
{_bar_chart([(r["_label"], r["_train"]["samples_per_s"]) for r in reports], "throughput", "samples/s")}
{_bar_chart([(r["_label"], r["_train"]["step_time_s"]) for r in reports], "step time", "s")}
</body></html>
"""
