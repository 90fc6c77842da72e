"""Static HTML of the report: the index (summary, plots) and the gallery pages.

Self-contained: inline CSS and plain inline JavaScript (class filter), relative links to
PNG/JPEG files beside the pages; no server, no network. Counts carry ``id`` attributes
so tests and scripts can read them back.
"""

from __future__ import annotations

from html import escape
from typing import Any

from dpl_tools.evaluation.pseudo_quality import VIEW_TITLES, VIEWS
from dpl_tools.report.draw import class_name
from dpl_tools.report.gallery import GalleryItem
from dpl_tools.report.summary import LabelSummary

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#eee}td.l,th.l{text-align:left}
.plots img{margin:.3em;border:1px solid #ddd;background:#fff}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure.thumb{margin:0;padding:6px;background:#fff;border:1px solid #ddd;width:330px}
figure.thumb img{display:block;max-width:320px;max-height:320px}
figcaption{font-size:12px;margin-top:4px;word-break:break-all}
.bad{color:#b00}.nav a{margin-right:.5em}.legend span{margin-right:1.2em}
code{font-size:90%}
"""

FILTER_JS = """
function applyFilter(){
  var cls=document.getElementById('cls').value;
  var onlyChanged=document.getElementById('changed').checked;
  var err=document.getElementById('err').value;
  var shown=0;
  document.querySelectorAll('figure.thumb').forEach(function(f){
    var ok=!cls||f.dataset.classes.split(' ').indexOf(cls)>=0;
    ok=ok&&(!onlyChanged||f.dataset.changed==='1');
    ok=ok&&(!err||Number(f.dataset[err]||0)>0);
    f.style.display=ok?'':'none'; if(ok){shown++;}
  });
  document.getElementById('shown').textContent=shown;
}
function filterFromHash(){
  // page-001.html#err=fp&cls=2 opens the page filtered
  location.hash.replace(/^#/,'').split('&').forEach(function(kv){
    var p=kv.split('='), el=document.getElementById(p[0]);
    if(el&&p.length==2){el.value=decodeURIComponent(p[1]);}
  });
  applyFilter();
}
document.addEventListener('DOMContentLoaded', filterFromHash);
"""
ERROR_FILTERS = (("fp", "false positives"), ("fn", "missed objects"),
                 ("uncertain", "uncertain boxes"))  # fmt: skip
TRUTH_LEGEND = (
    '<p class="legend"><span><b style="color:#28c83c">&#9472;</b> truth box</span>'
    '<span><b style="color:#e61e1e">&#9473;&#9473;</b> kept label with no truth of its class '
    '(false positive)</span><span><b style="color:#e6c800">&#9473;&#9473;</b> truth box no '
    "kept label found (missed)</span></p>"
)

LEGEND = (
    '<p class="legend"><span><b style="color:#ff9600">- - -</b> teacher box, class, score</span>'
    '<span><b style="color:#00b4d0">&#9473;&#9473;</b> polished box, class, polisher '
    'probability</span><span><b style="color:#999">&#9473;&#9473;</b> not kept for '
    'classification</span><span><b style="color:#ff28c8">class</b> label changed by the '
    "polisher</span></p>"
)


def html_page(title: str, body: str, script: str = "") -> str:
    """A self-contained HTML page (the report's style inlined)."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{CSS}</style>"
        + (f"<script>{script}</script>" if script else "")
        + f"</head>\n<body>\n{body}\n</body></html>\n"
    )


def cell_text(value: Any) -> str:
    """A table cell's text: floats to 3 decimals, n/a for a missing or negative value."""
    if value is None or (isinstance(value, float) and value < 0):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def page_name(page: int) -> str:
    """File name of gallery page ``page`` (1-based)."""
    return f"page-{page:03d}.html"


def _summary_html(s: LabelSummary, names: dict[int, str]) -> str:
    rows = [
        ("images-ok", "images processed", s.images_ok),
        ("images-skipped", "images skipped (unreadable)", s.images_skipped),
        ("images-empty", "images with no box", s.images_empty),
        ("boxes-teacher", "teacher boxes", s.teacher_boxes),
        ("labels-changed", "labels changed by the polisher", s.labels_changed),
        ("kept-cls", "boxes kept for classification", s.kept_cls),
        ("kept-reg", "boxes kept for regression", s.kept_reg),
    ]
    out = ["<h2>Summary</h2><table>"]
    out += [f'<tr><th class="l">{t}</th><td id="{i}">{v}</td></tr>' for i, t, v in rows]
    out.append("</table><h2>Boxes per class</h2><table>")
    out.append(
        '<tr><th class="l">class</th><th>id</th><th>teacher boxes</th>'
        "<th>classification pseudo labels</th><th>regression pseudo labels</th></tr>"
    )
    for label in s.labels:
        out.append(
            f'<tr><td class="l">{escape(class_name(names, label))}</td><td>{label}</td>'
            f'<td id="before-{label}">{s.before.get(label, 0)}</td>'
            f'<td id="after-{label}">{s.after.get(label, 0)}</td>'
            f'<td id="reg-{label}">{s.regression.get(label, 0)}</td></tr>'
        )
    out.append("</table>")
    return "\n".join(out)


def _quality_html(q: dict[str, Any]) -> str:
    im, lc, bq = q["images"], q["label_changes"], q["box_quality"]
    out = [
        "<h2>Against ground truth</h2>",
        f"<p>{im['evaluated']} images with ground truth, {q['gt_boxes']} truth boxes "
        f"({im['not_in_gt']} processed images not in the ground truth).</p><table>",
        '<tr><th class="l">view</th><th>boxes</th><th>P@.5</th><th>R@.5</th><th>P@.75</th>'
        "<th>R@.75</th><th>mean IoU</th><th>AP</th><th>AP50</th><th>AP75</th></tr>",
    ]
    for name in VIEWS:
        v = q["views"][name]
        cells = [v["boxes"], v["precision50"], v["recall50"], v["precision75"], v["recall75"]]
        cells += [v["mean_iou"], v["AP"], v["AP50"], v["AP75"]]
        out.append(
            f'<tr><td class="l">{VIEW_TITLES[name]}</td>'
            + "".join(f"<td>{cell_text(c)}</td>" for c in cells)
            + "</tr>"
        )
    out.append("</table>")
    out.append(
        f"<p>Labels changed: {lc['changed']} ({lc['right']} right, {lc['broke']} broke a right "
        f"label, {lc['no_truth']} without truth at IoU 0.5). Box IoU to truth over "
        f"{bq['boxes']} boxes with teacher IoU &ge; 0.5: {cell_text(bq['mean_iou_before'])} &rarr; "
        f"{cell_text(bq['mean_iou_after'])} ({_pct(bq['improved_fraction'])} improved). "
        "P/R: class-aware greedy matching (COCO); mean IoU: class-agnostic at IoU &ge; 0.5.</p>"
    )
    return "\n".join(out)


def _per_class_html(q: dict[str, Any]) -> str:
    """Per class: truth boxes, then P@.5 / R@.5 / AP of each view (the same matches as the
    table above)."""
    first = q["views"][VIEWS[0]].get("per_class", {})
    out = ["<h2>Per class</h2><table>", '<tr><th class="l">class</th><th>truth</th>']
    out += [f"<th>{VIEW_TITLES[v]} P@.5</th><th>R@.5</th><th>AP</th>" for v in VIEWS]
    out.append("</tr>")
    for i, name in enumerate(first):
        cells = [f'<td class="l">{escape(name)}</td><td>{first[name]["gt_boxes"]}</td>']
        for v in VIEWS:
            c = q["views"][v]["per_class"][name]
            cells += [f'<td id="pc-{v}-{k}-{i}">{cell_text(c[k])}</td>'
                      for k in ("precision50", "recall50", "AP")]  # fmt: skip
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _keep_rule_html(sweep: dict[str, Any], sources: dict[str, Any]) -> str:
    """The keep rule's operating point on these images, and how to read its plot."""
    p = sweep["operating_point"]
    where = {k: sources.get(f"{k}_source", "") for k in ("cls_prob", "teacher_score")}
    shown = ", ".join(f"{k} {p[k]:g}" + (f" ({where[k]})" if where[k] else "") for k in where)
    note = "" if sweep["exact"] else (
        " This file predates the polisher_label column: relabelling at other thresholds is "
        "not replayed, the labels as polished stand in."
    )  # fmt: skip
    return (
        f"<h2>Keep rule</h2><p>Operating point: {escape(shown)}. On these "
        f'{sweep["images"]} images it keeps <span id="keep-kept">{p["kept"]}</span> '
        f'classification pseudo labels: P@.5 <span id="keep-p">{cell_text(p["precision"])}</span>, '
        f'R@.5 <span id="keep-r">{cell_text(p["recall"])}</span>, '
        f'F1 <span id="keep-f1">{cell_text(p["f1"])}</span>. The plot "Keep rule" shows what '
        "another threshold would give (each curve moves one threshold, the other stays at "
        f"the operating point); <code>dpl polish --cls-prob X --teacher-score Y</code> "
        f"applies it.{escape(note)}</p>"
    )


def index_html(
    source: str,
    meta_lines: list[str],
    summary: LabelSummary,
    names: dict[int, str],
    plots: list[tuple[str, str]],
    pages: int,
    gallery_count: int,
    bad_images: list[tuple[str, str]],
    quality: dict[str, Any] | None,
    sweep: dict[str, Any] | None = None,
    thresholds: dict[str, Any] | None = None,
) -> str:
    """The report's front page."""
    body = [f"<h1>Pseudo-label report</h1><p>Labels: <code>{escape(source)}</code></p>"]
    if meta_lines:
        body.append("<p>" + "<br>".join(escape(line) for line in meta_lines) + "</p>")
    body.append(_summary_html(summary, names))
    if quality is not None:
        body.append(_quality_html(quality))
        body.append(_per_class_html(quality))
    if sweep is not None:
        body.append(_keep_rule_html(sweep, thresholds or {}))
    body.append('<h2>Plots</h2><div class="plots">')
    body += [f'<img src="plots/{f}" alt="{escape(t)}" title="{escape(t)}">' for t, f in plots]
    body.append("</div>")
    body.append(
        f'<h2>Gallery</h2><p><span id="gallery-images">{gallery_count}</span> images, largest '
        "corrections first, in pages: "
        + " ".join(f'<a href="{page_name(p)}">{p}</a>' for p in range(1, pages + 1))
        + "</p>"
        + LEGEND
    )
    if bad_images:
        body.append(f'<h2 class="bad">Unreadable images ({len(bad_images)})</h2><ul>')
        body += [f"<li><code>{escape(n)}</code>: {escape(r)}</li>" for n, r in bad_images]
        body.append("</ul>")
    return html_page("dpl pseudo-label report", "\n".join(body))


def _figure(item: GalleryItem, names: dict[int, str]) -> str:
    classes = " ".join(str(c) for c in sorted(item.classes))
    lines = []
    for r in item.rows[:8]:
        t = f"{escape(class_name(names, r['teacher_label']))} {r['teacher_score'] or 0:.2f}"
        if r["polished_label"] is not None:
            p = escape(class_name(names, r["polished_label"]))
            prob = r["polisher_prob"]
            t += f" &rarr; {p}" + (f" p{prob:.2f}" if prob is not None else "")
        flags = "".join(f for f, on in (("C", r["use_cls"]), ("R", r["use_reg"])) if on)
        lines.append(f"{t} [{flags or '-'}]")
    if len(item.rows) > 8:
        lines.append(f"&hellip; {len(item.rows) - 8} more")
    if item.thumb:
        img = f'<img src="thumbs/{item.thumb}" alt="{escape(item.file_name)}" loading="lazy">'
    else:
        img = f'<p class="bad">unreadable: {escape(item.error or "")}</p>'
    errors = item.errors
    data = "".join(f' data-{k}="{v}"' for k, v in errors.items())
    marks = ""
    if item.truth is not None:
        marks = (f"<br>{errors['tp']} true positive(s), {errors['fp']} false positive(s), "
                 f"{errors['fn']} missed, {errors['uncertain']} uncertain")  # fmt: skip
    return (
        f'<figure class="thumb" data-classes="{classes}" data-changed="{int(item.changed)}"'
        f"{data}>{img}<figcaption><b>{escape(item.file_name)}</b> (correction "
        f"{item.correction:.2f}){marks}<br>{'<br>'.join(lines) or 'no boxes'}</figcaption>"
        "</figure>"
    )


def gallery_html(
    items: list[GalleryItem], page: int, pages: int, names: dict[int, str], classes: list[int]
) -> str:
    """One gallery page with navigation and the class filter."""
    nav = ['<p class="nav"><a href="index.html">summary</a>']
    if page > 1:
        nav.append(f'<a href="{page_name(page - 1)}">&larr; previous</a>')
    nav += [
        f"<b>{p}</b>" if p == page else f'<a href="{page_name(p)}">{p}</a>'
        for p in range(1, pages + 1)
    ]
    if page < pages:
        nav.append(f'<a href="{page_name(page + 1)}">next &rarr;</a>')
    nav.append("</p>")
    options = "".join(
        f'<option value="{c}">{escape(class_name(names, c))}</option>' for c in classes
    )
    with_truth = any(item.truth is not None for item in items)
    kinds = [(k, t) for k, t in ERROR_FILTERS if with_truth or k == "uncertain"]
    errors = "".join(f'<option value="{k}">with {t}</option>' for k, t in kinds)
    body = [
        f"<h1>Gallery, page {page} of {pages}</h1>",
        " ".join(nav),
        '<p>class: <select id="cls" onchange="applyFilter()"><option value="">all</option>'
        f"{options}</select> "
        '<label><input type="checkbox" id="changed" onchange="applyFilter()"> only changed '
        'labels</label> images: <select id="err" onchange="applyFilter()"><option '
        f'value="">all</option>{errors}</select> &mdash; <span id="shown">{len(items)}</span>'
        " shown</p>",
        LEGEND + (TRUTH_LEGEND if with_truth else ""),
        '<div class="grid">',
        *(_figure(item, names) for item in items),
        "</div>",
        " ".join(nav),
    ]
    return html_page(f"dpl report: gallery page {page}", "\n".join(body), FILTER_JS)
