"""Rendering helpers shared by the portal's pages."""

from __future__ import annotations

import math
from typing import Any

from litestar import Request
from litestar.response import Template
from markupsafe import Markup, escape

from appliance.identity.roles import Permission, role_allows
from appliance.identity.sessions import SessionInfo

#: The portal's Content-Security-Policy: its own scripts and styles only (no inline code), images from
#: itself and ``data:`` URLs (generated images and dataset previews are sent in the page, never stored).
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
                           "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

#: Route options of a portal page needing ``permission``.


def portal(permission: Permission | None = None) -> dict[str, Any]:
    opt: dict[str, Any] = {"portal": True}
    if permission is not None:
        opt["permission"] = permission
    return opt


def session_of(request: Request) -> SessionInfo:
    return request.scope["state"]["portal_session"]


def page(request: Request, template: str, *, section: str = "", status_code: int = 200, **context: Any) -> Template:
    """A full page with the session's navigation, CSRF token and permission helper."""
    info: SessionInfo | None = request.scope.get("state", {}).get("portal_session")
    principal = info.principal if info else None

    def can(permission: str) -> bool:
        return principal is not None and role_allows(principal.role, Permission(permission))

    return Template(
        template_name=template, status_code=status_code,
        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff"},
        context={"info": info, "principal": principal, "can": can, "section": section,
                 "csrf": info.csrf_token if info else "", **context},
    )


def _frame(width: int, height: int, pads: tuple[int, int, int, int], x_label: str, y_label: str) -> list[str]:
    """A chart's opening ``<svg>`` (labelled "y by x") and its two axes; ``pads``: left, bottom, top, right."""
    pad_l, pad_b, pad_t, pad_r = pads
    return [f'<svg role="img" aria-label="{escape(y_label)} by {escape(x_label)}" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}">',
            f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - pad_r}" y2="{height - pad_b}" stroke="#999"/>',
            f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{height - pad_b}" stroke="#999"/>']


def line_chart(series: dict[str, list[tuple[float, float]]], *, width: int = 640, height: int = 240,
               x_label: str = "step", y_label: str = "loss") -> Markup:
    """An inline SVG line chart (readable without JavaScript); each series gets its own dash style."""
    points = [p for s in series.values() for p in s]
    if not points:
        return Markup('<p class="muted">No data yet.</p>')
    pad_l, pad_b, pad_t, pad_r = 48, 28, 10, 140
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x: float) -> float:
        return pad_l + (x - x0) / (x1 - x0) * (width - pad_l - pad_r)

    def sy(y: float) -> float:
        return height - pad_b - (y - y0) / (y1 - y0) * (height - pad_b - pad_t)

    styles = ["", "6 4", "2 3", "10 3 2 3"]
    parts = _frame(width, height, (pad_l, pad_b, pad_t, pad_r), x_label, y_label)
    for frac in (0, 0.5, 1):
        yv = y0 + frac * (y1 - y0)
        parts.append(f'<text x="4" y="{sy(yv) + 4:.1f}">{yv:.3g}</text>')
        xv = x0 + frac * (x1 - x0)
        parts.append(f'<text x="{sx(xv) - 8:.1f}" y="{height - 8}">{xv:.0f}</text>')
    for i, (name, pts) in enumerate(series.items()):
        if not pts:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(pts))
        dash = f' stroke-dasharray="{styles[i % len(styles)]}"' if styles[i % len(styles)] else ""
        parts.append(f'<polyline fill="none" stroke="#0b57d0" stroke-width="2"{dash} points="{path}"/>')
        if len(pts) == 1:
            x, y = pts[0]
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="#0b57d0"/>')
        ly = pad_t + 14 + 16 * i
        parts.append(f'<line x1="{width - pad_r + 8}" y1="{ly - 4}" x2="{width - pad_r + 30}" y2="{ly - 4}" '
                     f'stroke="#0b57d0" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{width - pad_r + 34}" y="{ly}">{escape(name)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def scatter_chart(points: list[tuple[float, float, str]], *, x_label: str, y_label: str = "validation loss",
                  log_x: bool = False, width: int = 480, height: int = 220) -> Markup:
    """An inline SVG scatter of ``(x, y, kind)`` points, e.g. a search's trials: validation loss by one parameter.

    ``kind`` is ``best`` (a ringed dot), ``complete`` (a dot) or ``pruned`` (a hollow dot, at its last report).
    ``log_x`` spaces x by its logarithm (learning rates); it needs every x above 0.
    """
    if not points:
        return Markup('<p class="muted">No trials yet.</p>')
    pad_l, pad_b, pad_t, pad_r = 48, 28, 10, 16
    tx = math.log10 if log_x else (lambda v: v)
    xs, ys = [tx(p[0]) for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x: float) -> float:
        return pad_l + (tx(x) - x0) / (x1 - x0) * (width - pad_l - pad_r)

    def sy(y: float) -> float:
        return height - pad_b - (y - y0) / (y1 - y0) * (height - pad_b - pad_t)

    parts = _frame(width, height, (pad_l, pad_b, pad_t, pad_r), x_label, y_label)
    for frac in (0, 0.5, 1):
        yv = y0 + frac * (y1 - y0)
        parts.append(f'<text x="4" y="{sy(yv) + 4:.1f}">{yv:.3g}</text>')
        xv = x0 + frac * (x1 - x0)
        xv = 10 ** xv if log_x else xv
        parts.append(f'<text x="{sx(xv) - 8:.1f}" y="{height - 8}">{xv:.3g}</text>')
    parts.append(f'<text x="{width / 2:.0f}" y="{height - 8}">{escape(x_label)}</text>')
    for x, y, kind in points:
        fill = "none" if kind == "pruned" else "#0b57d0"
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{fill}" stroke="#0b57d0">'
                     f"<title>{escape(x_label)} {x:.3g}: {escape(y_label)} {y:.4g} ({escape(kind)})</title></circle>")
        if kind == "best":
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="8" fill="none" stroke="#0b57d0"/>')
    parts.append("</svg>")
    return Markup("".join(parts))


def bar_chart(counts: dict[str, int], *, width: int = 480) -> Markup:
    """Horizontal bars with their numbers, as inline SVG."""
    if not counts:
        return Markup('<p class="muted">Nothing found.</p>')
    top = max(counts.values()) or 1
    row, label_w = 22, 170
    height = row * len(counts) + 6
    parts = [f'<svg role="img" aria-label="counts by type" width="{width}" height="{height}">']
    for i, (name, n) in enumerate(sorted(counts.items(), key=lambda kv: -kv[1])):
        w = max(2.0, (width - label_w - 50) * n / top)
        y = i * row + 4
        parts.append(f'<text x="0" y="{y + 13}">{escape(name)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="16" fill="#0b57d0"/>')
        parts.append(f'<text x="{label_w + w + 6:.1f}" y="{y + 13}">{n}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def percent(done: float | None, total: float | None) -> int:
    if not done or not total:
        return 0
    return max(0, min(100, math.floor(100 * done / total)))
