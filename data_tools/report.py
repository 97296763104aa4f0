"""report.html: a self-contained contact sheet (thumbnails inline), problems and a bucket histogram."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from common.images import decode_rgb

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}.muted{color:#777}
.summary span{display:inline-block;margin:8px 12px 8px 0;padding:4px 10px;border-radius:12px;background:#eee}
.error{background:#fde2e1!important;color:#9b1c1c}.warning{background:#fff3cd!important;color:#7a5b00}
.info{background:#e7f1ff!important;color:#1d4f91}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:8px;overflow-wrap:anywhere}
.card.dropped{opacity:.55;border-style:dashed}
.card img,.card .none{width:100%;height:180px;object-fit:contain;background:#f0f0f0;border-radius:4px}
.card .none{display:flex;align-items:center;justify-content:center;color:#999;font-size:12px}
.card .name{font-weight:600;font-size:12px}.card .cap{font-size:12px;margin:4px 0}
.card .meta{font-size:11px;color:#777}
.card ul{margin:4px 0 0;padding:0;list-style:none}
.card li{font-size:11px;margin:2px 0;padding:2px 6px;border-radius:4px}
.bars div{display:flex;align-items:center;margin:2px 0;font-size:12px}
.bars b{display:inline-block;height:14px;background:#4a7bd0;margin:0 8px;border-radius:2px}
table{border-collapse:collapse;font-size:12px}td{padding:3px 8px;border-bottom:1px solid #eee}
.next{background:#e6f4ea;padding:8px 12px;border-radius:8px;display:inline-block}
"""


def _thumb(path: Path) -> str:
    image = decode_rgb(path.read_bytes(), path.name)
    image.thumbnail((320, 320))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def write_report(target: Path, report: dict[str, Any], root: Path) -> None:
    e = html.escape
    s = report["summary"]
    trigger = report["options"]["trigger"]
    trigger_code = f" and <code>data.trigger: {e(str(trigger))}</code>" if trigger else ""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Dataset report</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Dataset report</h1><div class='muted'>{e(report['source'])} ({e(report['source_kind'])}) — "
        f"resolution {report['options']['resolution']}, trigger {e(str(report['options']['trigger']))}, "
        f"fix {'on' if report['options']['fix'] else 'off'}</div>",
        "<p class='next'>Next: train on this folder with <code>data.path: <span id='here'>this folder</span></code>"
        f"{trigger_code}"
        " (or check <code>report.json</code> from a script).</p>"
        # the folder's path is filled in when the page is opened, so equal input still gives equal bytes
        "<script>document.getElementById('here').textContent = decodeURIComponent("
        "location.pathname.replace(/\\/[^\\/]*$/, ''));</script>"
        "<div class='summary'>"
        f"<span>{s['kept']} of {s['files']} images kept</span>"
        f"<span class='error'>{s['errors']} errors</span><span class='warning'>{s['warnings']} warnings</span>"
        f"<span class='info'>{s['infos']} notes</span></div>",
    ]
    if report["dataset_problems"]:
        parts.append("<h2>Dataset</h2><table>")
        for p in report["dataset_problems"]:
            parts.append(
                f"<tr><td class='{p['severity']}'>{p['severity']}</td><td>{e(p['message'])}</td>"
                f"<td class='muted'>{e(p['fix'])}</td></tr>"
            )
        parts.append("</table>")
    counts: dict[tuple[str, str], int] = {}
    for image in report["images"]:
        for p in image["problems"]:
            counts[(p["severity"], p["code"])] = counts.get((p["severity"], p["code"]), 0) + 1
    if counts:
        order = {"error": 0, "warning": 1, "info": 2}
        parts.append("<h2>Findings</h2><table>")
        for (severity, code), n in sorted(
            counts.items(), key=lambda kv: (order[kv[0][0]], -kv[1], kv[0][1])
        ):
            parts.append(
                f"<tr><td class='{severity}'>{severity}</td><td><code>{e(code)}</code></td><td>{n}</td></tr>"
            )
        parts.append("</table>")
    parts.append("<h2>Aspect buckets</h2><div class='bars'>")
    top = max(report["buckets"].values(), default=1)
    for bucket, count in report["buckets"].items():
        parts.append(
            f"<div><code>{bucket}</code><b style='width:{round(240 * count / top)}px'></b>{count}</div>"
        )
    parts.append("</div><h2>Images</h2><div class='grid'>")
    for img in report["images"]:
        thumb = (
            f"<img src='{_thumb(root / img['output'])}' alt=''>"
            if img["output"]
            else "<div class='none'>left out</div>"
        )
        caption = img["caption"] or "(no caption)"
        short = caption if len(caption) <= 240 else caption[:240] + "…"
        meta = f"{img['width']}×{img['height']} {e(img['mode'])}" + (
            f" → bucket {img['bucket']}" if img["bucket"] else ""
        )
        problems = "".join(
            f"<li class='{p['severity']}' title='{e(p['fix'])}'>{e(p['message'])} — <i>{e(p['fix'])}</i></li>"
            for p in img["problems"]
        )
        refs = (
            f"<div class='meta'>references: {e(', '.join(img['references']))}</div>"
            if img["references"]
            else ""
        )
        parts.append(
            f"<div class='card{'' if img['kept'] else ' dropped'}'>{thumb}<div class='name'>{e(img['source'])}</div>"
            f"<div class='cap' title='{e(caption)}'>{e(short)}</div><div class='meta'>{meta}</div>{refs}"
            f"<ul>{problems}</ul></div>"
        )
    parts.append("</div></body></html>\n")
    target.write_text("".join(parts), encoding="utf-8")
