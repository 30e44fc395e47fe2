"""The lineage picture: an SVG drawn on the server, so a plain browser (or curl) shows it without scripts.

Layout is deliberately simple and stable: one column per kind, as each collection declares it
(datasets, trainings, checkpoints, models and experiments, tasks), nodes stacked in each column in key order, edges as curves with an
arrow from upstream to downstream. Every node is a link to its page; missing nodes (a run or
dataset that is referenced but not registered) are dashed.
"""

from __future__ import annotations

from html import escape

from maelflow_registry import collections

NODE_W, NODE_H, COL_GAP, ROW_GAP, MARGIN, HEADER = 230, 38, 90, 18, 20, 34
UNKNOWN_COLOUR = "#eeeeee"


def column_title(column: int) -> str:
    """The heading of a column: the titles of the collections drawn in it ("Models / Experiments")."""
    return " / ".join(c.title for c in collections.all_collections() if c.column == column)


def _short(text: str, limit: int = 30) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render(graph: dict, link_prefix: str = "") -> str:
    nodes = graph["nodes"]
    columns: dict[int, list[dict]] = {}
    for node in sorted(nodes, key=lambda n: (n["column"], n["collection"], n["key"])):
        columns.setdefault(node["column"], []).append(node)
    used = sorted(columns)
    col_x = {c: MARGIN + i * (NODE_W + COL_GAP) for i, c in enumerate(used)}
    pos: dict[str, tuple[float, float]] = {}
    for c, members in columns.items():
        for row, node in enumerate(members):
            pos[node["id"]] = (col_x[c], MARGIN + HEADER + row * (NODE_H + ROW_GAP))
    width = MARGIN * 2 + max(len(used), 1) * NODE_W + max(len(used) - 1, 0) * COL_GAP
    height = MARGIN * 2 + HEADER + max((len(m) for m in columns.values()), default=1) * (NODE_H + ROW_GAP)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="lineage" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="lineage of {escape(graph["root"])}">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>',
           '<style>text{font-family:system-ui,sans-serif;font-size:12px} .rel{font-size:10px;fill:#666}'
           ' .head{font-weight:600;font-size:13px}</style>']
    for c in used:
        title = column_title(c)
        out.append(f'<text class="head" x="{col_x[c]}" y="{MARGIN + 14}">{escape(title)}</text>')
    for edge in graph["edges"]:
        if edge["source"] not in pos or edge["target"] not in pos:
            continue
        (sx, sy), (tx, ty) = pos[edge["source"]], pos[edge["target"]]
        if sx == tx:  # same column (checkpoint -> checkpoint): loop out to the right
            x1, y1, x2, y2 = sx + NODE_W, sy + NODE_H / 2, tx + NODE_W, ty + NODE_H / 2
            d = f"M {x1} {y1} C {x1 + 40} {y1}, {x2 + 40} {y2}, {x2} {y2}"
        else:
            if sx > tx:
                (sx, sy), (tx, ty) = (tx, ty), (sx, sy)
            x1, y1, x2, y2 = sx + NODE_W, sy + NODE_H / 2, tx, ty + NODE_H / 2
            mid = (x1 + x2) / 2
            d = f"M {x1} {y1} C {mid} {y1}, {mid} {y2}, {x2} {y2}"
        out.append(f'<path class="edge" d="{d}" fill="none" stroke="#555" stroke-width="1.3" '
                   f'marker-end="url(#arrow)" data-source="{escape(edge["source"])}" '
                   f'data-target="{escape(edge["target"])}"><title>{escape(edge["relation"])}</title></path>')
    for node in nodes:
        x, y = pos[node["id"]]
        coll = collections.find(node["collection"])
        fill = coll.colour if coll else UNKNOWN_COLOUR
        root = node["id"] == graph["root"]
        stroke = "#b91c1c" if root else "#555"
        dash = ' stroke-dasharray="5 3"' if node["missing"] else ""
        kind = coll.singular.lower() if coll else node["collection"]
        label = escape(_short(node["label"]))
        box = (f'<rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="6" fill="{fill}" '
               f'stroke="{stroke}" stroke-width="{2.5 if root else 1}"{dash}/>'
               f'<text x="{x + 8}" y="{y + 15}" class="rel">{escape(kind)}{" (not registered)" if node["missing"] else ""}</text>'
               f'<text x="{x + 8}" y="{y + 30}">{label}</text>'
               f'<title>{escape(node["collection"])}/{escape(node["label"])}</title>')
        attrs = f'class="node" data-id="{escape(node["id"])}"'
        if node["missing"]:
            out.append(f"<g {attrs}>{box}</g>")
        else:
            href = f'{link_prefix}/{escape(node["collection"])}/{escape(node["key"])}'
            out.append(f'<a href="{href}" {attrs}>{box}</a>')
    out.append("</svg>")
    return "\n".join(out)
