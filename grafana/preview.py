"""Render a preview of the dashboard without Grafana: grafana/dashboard-preview.png.

It starts a scribe-events server and a Prometheus scraping it every second (both local, as
tests/test_grafana.py does), puts the server under the same load as that test, then runs every
panel query of scribe-events.json through Prometheus's query_range API and draws the panels in
their dashboard layout in a plain HTML page, photographed by headless Chromium. The picture shows
the dashboard's own queries on real data; the drawing is ours, not Grafana's.

    .venv/bin/python grafana/preview.py [--seconds 45] [--out grafana/dashboard-preview.png]
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from playwright.sync_api import sync_playwright  # noqa: E402

from tests.harness import ThreadServer  # noqa: E402
from tests.test_grafana import DASHBOARD, LOAD_SETTINGS, Load, Prometheus, _expand, _panels  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
COLORS = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#fade2a", "#c4162a"]
UNIT_H = 30  # pixels per grid unit of height, as Grafana draws them
WIDTH = 1600


def _si(value: float, unit: str) -> str:
    if value != value:  # NaN
        return "-"
    if unit == "bytes":
        for prefix in ("B", "KiB", "MiB", "GiB"):
            if abs(value) < 1024 or prefix == "GiB":
                return f"{value:.3g} {prefix}"
            value /= 1024
    if unit == "s":
        if value == 0 or abs(value) >= 1:
            return f"{value:.3g} s"
        return f"{value * 1000:.3g} ms" if abs(value) >= 0.001 else f"{value * 1e6:.3g} µs"
    suffix = {"ops": " ops/s", "reqps": " req/s"}.get(unit, "")
    return f"{value:.3g}{suffix}"


def _legend(fmt: str, labels: dict[str, str]) -> str:
    out = fmt
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out.replace("{{instance}}", "").strip() or "value"


def _series(
    prom: Prometheus, panel: dict[str, Any], start: float, end: float
) -> list[tuple[str, list[tuple[float, float]]]]:
    series = []
    for target in panel["targets"]:
        data = prom.api("query_range", query=_expand(target["expr"]), start=start, end=end, step="1s")
        for result in data["result"]:
            points = [(float(t), float(v)) for t, v in result["values"] if v not in ("NaN", "+Inf", "-Inf")]
            series.append((_legend(target.get("legendFormat", ""), result["metric"]), points))
    return series


def _svg(
    series: list[tuple[str, list[tuple[float, float]]]], unit: str, w: int, h: int, t0: float, t1: float
) -> str:
    values = [v for _, pts in series for _, v in pts] or [0.0]
    top = max(max(values), 0.0) * 1.1 or 1.0
    low = min(min(values), 0.0)
    left, pad = 64, 6

    def x(t: float) -> float:
        return left + (t - t0) / max(t1 - t0, 1) * (w - left - pad)

    def y(v: float) -> float:
        return pad + (1 - (v - low) / (top - low)) * (h - 2 * pad - 14)

    parts = [f'<svg width="{w}" height="{h}">']
    for i in range(5):
        v = low + (top - low) * i / 4
        parts.append(f'<line x1="{left}" x2="{w - pad}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>')
        parts.append(
            f'<text x="{left - 4}" y="{y(v) + 4:.1f}" class="axis" text-anchor="end">{_si(v, unit)}</text>'
        )
    parts.append(f'<text x="{left}" y="{h - 1}" class="axis">-{int(t1 - t0)} s</text>')
    parts.append(f'<text x="{w - pad}" y="{h - 1}" class="axis" text-anchor="end">now</text>')
    for i, (_, pts) in enumerate(series):
        line = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts)
        parts.append(f'<polyline points="{line}" stroke="{COLORS[i % len(COLORS)]}" class="line"/>')
    parts.append("</svg>")
    return "".join(parts)


def _panel_html(prom: Prometheus, panel: dict[str, Any], start: float, end: float) -> str:
    pos, unit = panel["gridPos"], panel["fieldConfig"]["defaults"].get("unit", "short")
    w = round(pos["w"] / 24 * WIDTH) - 8
    h = pos["h"] * UNIT_H - 8
    style = f"left:{round(pos['x'] / 24 * WIDTH)}px;top:{pos['y'] * UNIT_H}px;width:{w}px;height:{h}px"
    title = f'<div class="title">{html.escape(panel["title"])}</div>'
    series = _series(prom, panel, start, end)
    if panel["type"] == "stat":
        last = series[0][1][-1][1] if series and series[0][1] else float("nan")
        mappings = panel["fieldConfig"]["defaults"].get("mappings", [])
        text = _si(last, unit)
        for mapping in mappings:
            text = mapping["options"].get(f"{last:g}", {}).get("text", text)
        body = f'<div class="stat">{html.escape(text)}</div>'
    else:
        legend = "".join(
            f'<span><i style="background:{COLORS[i % len(COLORS)]}"></i>{html.escape(name)}</span>'
            for i, (name, _) in enumerate(series)
        )
        body = _svg(series, unit, w - 12, h - 60, start, end) + f'<div class="legend">{legend}</div>'
    return f'<div class="panel" style="{style}">{title}{body}</div>'


def render(prom: Prometheus, seconds: float, out: Path) -> None:
    end = time.time()
    start = end - seconds
    panels = [p for p in _panels() if p["type"] != "row"]
    rows = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] == "row"]
    cells = [_panel_html(prom, p, start, end) for p in panels]
    cells += [
        f'<div class="row" style="top:{r["gridPos"]["y"] * UNIT_H}px">{html.escape(r["title"])}</div>'
        for r in rows
    ]
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels) * UNIT_H
    page = f"""<!doctype html><meta charset="utf-8"><style>
body{{margin:0;background:#111217;color:#ccccdc;font:12px Inter,Helvetica,Arial,sans-serif}}
header{{padding:10px 12px;font-size:16px}} header small{{color:#8e8e8e;font-size:12px;margin-left:12px}}
main{{position:relative;height:{height}px;margin:0 8px}}
.panel{{position:absolute;background:#181b1f;border:1px solid #2c3235;border-radius:2px;padding:4px 6px;overflow:hidden}}
.row{{position:absolute;left:0;font-size:14px;font-weight:500;padding-top:6px}}
.title{{font-weight:500;margin-bottom:2px;white-space:nowrap}}
.stat{{font-size:34px;font-weight:500;color:#73bf69;text-align:center;padding-top:14px}}
.grid{{stroke:#2c3235}} .axis{{fill:#8e8e8e;font-size:10px}} .line{{fill:none;stroke-width:1.5}}
.legend span{{margin-right:10px;white-space:nowrap;font-size:11px}}
.legend i{{display:inline-block;width:12px;height:3px;margin-right:4px;vertical-align:middle}}
</style><header>scribe-events <small>preview: the dashboard's queries on a local server under test load,
last {int(seconds)} s, drawn by grafana/preview.py (not Grafana)</small></header><main>{"".join(cells)}</main>"""
    html_file = out.with_suffix(".html")
    html_file.write_text(page)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": WIDTH + 16, "height": 900})
        tab.goto(html_file.as_uri())
        tab.screenshot(path=str(out), full_page=True)
        browser.close()
    html_file.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=45, help="how long to run the load before drawing")
    parser.add_argument("--out", type=Path, default=ROOT / "grafana" / "dashboard-preview.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = ThreadServer(Path(tmp) / "events.db", **LOAD_SETTINGS).start()
        prom = Prometheus(
            "/usr/bin/prometheus", Path(tmp) / "prometheus", [f"127.0.0.1:{server.port}"]
        ).start()
        try:
            with Load(server, max_s=args.seconds + 30):
                time.sleep(args.seconds)
                render(prom, args.seconds, args.out)
        finally:
            prom.stop()
            server.stop()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
