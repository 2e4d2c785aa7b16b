"""What a study shows: its table (CSV), its plot, its summary, and the progress line while it runs."""

from __future__ import annotations

import csv
import io
import time
from typing import Any

from rich.console import Console

from orchestrator.study.files import LAYER_KEYS, METRICS, SENSITIVITY_KEY, Item, sensitivity
from storage import fs

PLAIN_EVERY_S = 15.0


def describe(rec: dict[str, Any]) -> str:
    return f"{rec['layer']} (delta rms {rec[SENSITIVITY_KEY]:+.4f})"


CSV_COLUMNS = ("scaling", "index", "layer", "kind", "part", "weight_shape", "macs", "input_scale", "weight_scale",
               *LAYER_KEYS)


def table_rows(exact: dict[str, Any], results: dict[str, dict[str, Any]], scalings: list[str]) -> list[dict[str, Any]]:
    """The study's table: the float model, then per scaling its exact-table reference and its layers in study order."""
    rows = [{"scaling": "float", "index": "", "layer": "<float model>", "kind": "reference",
             **{k: exact[k] for k in METRICS}}]
    for label in scalings:
        ref = results.get(f"{label}/<all layers, exact table>")
        if ref:
            rows.append({**ref, "scaling": label, "index": "", "layer": "<all layers, exact table>",
                         "kind": "reference"})
        layer_rows = sorted((r for r in results.values() if r["scaling"] == label and r.get("layer")),
                            key=lambda r: r["index"])
        rows += layer_rows
    return [{k: r.get(k, "") for k in CSV_COLUMNS} for r in rows]


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("x".join(map(str, v)) if isinstance(v, list) else (f"{v:.6g}" if isinstance(v, float) else v))
                    for k, v in r.items()})
    return buf.getvalue()


KIND_COLOURS = {"pointwise": "tab:blue", "depthwise": "tab:orange", "dense": "tab:green"}


def plot(rows: list[dict[str, Any]], scalings: list[str], exact: dict[str, Any], title: str) -> bytes:
    """One panel per scaling: the rms change (metres, symlog) of each layer, bars coloured by kind;
    the dashed line is every layer at once with the exact table (the quantization error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    layer_rows = [r for r in rows if r["kind"] != "reference"]
    n = max((len([r for r in layer_rows if r["scaling"] == s]) for s in scalings), default=1)
    fig, axes = plt.subplots(len(scalings), 1, figsize=(max(8.0, 0.18 * n + 2), 3.2 * len(scalings) + 0.8),
                             squeeze=False)
    for ax, label in zip(axes[:, 0], scalings, strict=True):
        mine = [r for r in layer_rows if r["scaling"] == label]
        xs = list(range(len(mine)))
        ax.bar(xs, [r[SENSITIVITY_KEY] for r in mine], color=[KIND_COLOURS.get(r["kind"], "tab:gray") for r in mine])
        ref = next((r for r in rows if r["scaling"] == label and r["kind"] == "reference"), None)
        if ref and ref.get(SENSITIVITY_KEY) not in ("", None):
            ax.axhline(ref[SENSITIVITY_KEY], color="black", linestyle="--", linewidth=0.8)
        biggest = max((abs(r[SENSITIVITY_KEY]) for r in mine), default=0.0)
        if biggest > 0:  # symlog: a collapsed layer (metres) and a harmless one (micrometres) on one axis
            ax.set_yscale("symlog", linthresh=max(biggest * 1e-3, 1e-9))
        ax.set_ylabel("delta rms (m)")
        ax.set_title(f"{label} (float model rms {exact['rms']:.3f} m)", fontsize=9)
        ax.set_xticks(xs)
        ax.set_xticklabels([r["layer"].replace("encoder.features.", "e.").replace("decoder.", "d.") for r in mine],
                           rotation=90, fontsize=5)
        ax.axhline(0, color="gray", linewidth=0.5)
    handles = [Patch(color=c, label=k) for k, c in KIND_COLOURS.items()]
    handles.append(plt.Line2D([], [], color="black", linestyle="--", label="all layers, exact table"))
    fig.legend(handles=handles, loc="upper right", fontsize=7, ncol=4)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def summarize(rows: list[dict[str, Any]], scalings: list[str], exact: dict[str, Any], top: int = 3) -> dict[str, Any]:
    out: dict[str, Any] = {"float": {k: exact[k] for k in METRICS}, "scalings": {}}
    for label in scalings:
        mine = [r for r in rows if r["scaling"] == label and r["kind"] != "reference"]
        ref = next((r for r in rows if r["scaling"] == label and r["kind"] == "reference"), None)
        ranked = sorted(mine, key=lambda r: (-sensitivity(r), r["index"]))
        pick = lambda rs: [{"layer": r["layer"], "kind": r["kind"], "delta_rms": r["delta_rms"],  # noqa: E731
                            "delta_a1": r["delta_a1"],
                            "rms": r["rms"], "saturation": r["saturation"]} for r in rs]
        out["scalings"][label] = {
            "layers": len(mine),
            "most_sensitive": pick(ranked[:top]),
            "least_sensitive": pick(list(reversed(ranked[-top:]))),
            "all_layers_exact_table": {k: ref[k] for k in (*METRICS, "delta_rms")} if ref else None,
            "seconds": sum(r["seconds"] for r in mine),
        }
    return out


def print_summary(name: str, summary: dict[str, Any], sdir: str, record: dict[str, Any], console: Console) -> None:
    f = summary["float"]
    console.print(f"study '{name}': float model rms {f['rms']:.4f} a1 {f['a1']:.4f} rel {f['rel']:.4f}",
                  highlight=False)
    for label, s in summary["scalings"].items():
        q = s["all_layers_exact_table"]
        qtext = f"; all layers at once with the exact table: rms {q['rms']:.4f} (quantization error)" if q else ""
        console.print(f"  {label}: {s['layers']} layers{qtext}", highlight=False)
        for title, key in (("most sensitive", "most_sensitive"), ("least sensitive", "least_sensitive")):
            items = ", ".join(f"{r['layer']} ({r['kind']}, rms {r['rms']:.4f}, delta {r['delta_rms']:+.4f})"
                              for r in s[key])
            console.print(f"    {title}: {items}", highlight=False)
    ui = record["tracking_uri"]
    ui = f"mlflow ui --backend-store-uri {ui}" if ui.startswith("sqlite:") else ui
    console.print(f"  table {fs.join(sdir, 'table.csv')}, plot {fs.join(sdir, 'sensitivity.png')}; "
                  f"MLflow run {record['mlflow_run_id']} (open it with: {ui})", highlight=False)


class LayerProgress:
    """A bar over the study's results on a terminal; a line every PLAIN_EVERY_S s otherwise."""

    def __init__(self, console: Console, total: int, done: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.console, self.total, self.done = console, total, done
        self.live = console.is_terminal
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=console, disable=not self.live)
        self.last_plain = time.monotonic()
        self.first_at = time.monotonic()
        self.computed = 0

    def __enter__(self) -> LayerProgress:
        self.bar.start()
        self.task = self.bar.add_task("layers", total=self.total, completed=self.done)
        return self

    def advance(self, item: Item, rec: dict[str, Any]) -> None:
        self.done += 1
        self.computed += 1
        what = (f"{item.scaling} {rec.get('layer') or 'all layers, exact table'}: rms {rec['rms']:.4f} "
                f"({rec['delta_rms']:+.4f})")
        self.bar.update(self.task, advance=1, description=what)
        now = time.monotonic()
        if self.computed == 1:
            self.first_at = now  # the rate counts from the first result: worker start-up is no layer's
        if not self.live and (now - self.last_plain >= PLAIN_EVERY_S or self.done == self.total or self.computed == 1):
            self.last_plain = now
            rate = (self.computed - 1) / (now - self.first_at) if self.computed > 1 and now > self.first_at else None
            eta = f"{(self.total - self.done) / rate:.0f} s" if rate else "-"
            speed = f"{rate:.2f}/s" if rate else "-"
            self.console.print(f"results {self.done}/{self.total} | {what} | {speed} | ETA {eta}", highlight=False)

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()
