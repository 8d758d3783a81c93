"""What the evaluation report and the sweep report share: the paper's row names, tables,
figures and a document written as Markdown and HTML side by side.

Pure helpers: no torch, no Ray (the sweep report must import without torch); matplotlib
is imported inside the figure function only.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Sequence

# Names of the paper's Table 2 rows: ContrastivePretrain-Augment-Loss.
PRETRAIN_NAMES = {"ntxent": "NTXent", "batch_all": "BATriplet", "batch_hard": "BHTriplet"}
TRAIN_NAMES = {"batch_hard": "BHTriplet", "batch_all": "BATriplet", "cross_entropy": "CrossEntropy", "interval": "Interval"}


def pretrain_name(enabled: bool, loss: str | None, pretrained: bool = False) -> str:
    """The ContrastivePretrain part of a row name: the contrastive loss when pre-training ran,
    else ``Pretrained`` for weights of unknown origin (``pretrained``) or ``None``."""
    if enabled:
        return PRETRAIN_NAMES.get(loss, str(loss))
    return "Pretrained" if pretrained else "None"


def table2_row_name(
    *,
    pretrain_enabled: bool,
    pretrain_loss: str | None,
    augment_rare: bool,
    train_loss: str | None,
    pretrained: bool = False,
) -> str:
    """The paper's Table-2 row name ``ContrastivePretrain-Augment-Loss``, e.g. ``BHTriplet-Aug-BHTriplet``."""
    pretrain = pretrain_name(pretrain_enabled, pretrain_loss, pretrained)
    augment = "Aug" if augment_rare else "None"
    return f"{pretrain}-{augment}-{TRAIN_NAMES.get(train_loss, str(train_loss))}"


# ---------------------------------------------------------------- figures


def new_figure(width: float, height: float):
    """A matplotlib figure (inches, 100 dpi) on the Agg canvas: no display, no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig, **savefig: Any) -> bytes:
    """The figure as PNG bytes; ``savefig`` goes to ``Figure.savefig`` (e.g. ``bbox_inches="tight"``)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **savefig)
    return buffer.getvalue()


# ---------------------------------------------------------------- the document


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


REPORT_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%;display:block;margin:0.5em 0}
.note{color:#555;font-size:13px}h2{border-bottom:1px solid #ddd;padding-bottom:4px}"""


class ReportDoc:
    """Builds report.md and report.html side by side, so both always say the same.

    Images are kept in ``plots`` (file name -> PNG) for the caller to write under
    ``plots_dir``, which report.md links to; report.html embeds them as base64.
    """

    def __init__(self, plots_dir: str = "plots") -> None:
        self.plots_dir = plots_dir
        self.md: list[str] = []
        self.html: list[str] = []
        self.plots: dict[str, bytes] = {}

    def heading(self, level: int, text: str, anchor: str | None = None) -> None:
        self.md.append(f"{'#' * level} {text}\n")
        ident = f' id="{html.escape(anchor)}"' if anchor else ""
        self.html.append(f"<h{level}{ident}>{html.escape(text)}</h{level}>")

    def para(self, text: str, note: bool = False) -> None:
        self.md.append(text + "\n")
        opening = '<p class="note">' if note else "<p>"
        self.html.append(f"{opening}{html.escape(text)}</p>")

    def bullets(self, items: Sequence[str]) -> None:
        if items:
            self.md.append("\n".join(f"- {item}" for item in items) + "\n")
            self.html.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in items) + "</ul>")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.md.append(md_table(header, rows) + "\n")
        self.html.append(html_table(header, rows))

    def image(self, name: str, png: bytes | None, alt: str) -> None:
        if png is None:
            return
        self.plots[name] = png
        self.md.append(f"![{alt}]({self.plots_dir}/{name})\n")
        encoded = base64.b64encode(png).decode("ascii")
        self.html.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">')

    def markdown(self) -> str:
        return "\n".join(self.md)

    def html_page(self, title: str) -> str:
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                f"<style>{REPORT_CSS}</style></head><body>\n" + "\n".join(self.html) + "\n</body></html>\n")


__all__ = [
    "PRETRAIN_NAMES",
    "TRAIN_NAMES",
    "pretrain_name",
    "table2_row_name",
    "new_figure",
    "png_bytes",
    "md_table",
    "html_table",
    "REPORT_CSS",
    "ReportDoc",
]
