"""`p2p-fl report DIR`: DIR/report.html with its PNG plots beside it.

For a run folder (what `launch` writes): learning curves per node (training loss and
validation AUC per round, from metrics.jsonl), ROC curves of the final models on the
common test set against the centralized reference (recomputed from final_model.npz with the
Learner), the results table, per-node communication (bytes, messages, dropped messages by
reason) and the topology that ran.

The centralized reference for the ROC plot: `--centralized DIR` (a `p2p-fl centralized`
output folder), else a sibling folder of an experiment (`../centralized-seed<S>` with the
run's seed, else any `../centralized-seed*`). Without one the plot shows the federation's
models alone and says so.

For an experiment folder (what `experiment` writes): the results table, a plot of test AUC
per configuration with its spread over seeds, and links to the runs' folders.

For one site's folder (a deployed node's --out, or a launch run's site folder), and for each
site of a run: which data and test set, the classes with their training counts, AUC with a
95% bootstrap interval, the confusion matrix at the site's operating point (the threshold it
chose on its validation data), calibration (reliability plot and expected calibration
error), and which rounds the site trained and, in gossip, with how many neighbours it mixed;
all from the site's result.json, metrics.jsonl and test_predictions.npz.
"""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path

import numpy as np

IMAGE_CHECK = """<script>
// Marks the page once loaded: how many images decoded (a headless browser test reads it).
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const ok = images.filter((img) => img.complete && img.naturalWidth > 0).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + images.length);
});
</script>"""
STYLE = """<style>
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.8em; }
img { max-width: 100%; }
.note { color: #666; }
</style>"""


class ReportError(ValueError):
    """A folder that holds neither a run nor an experiment."""


def write_report(folder: Path, *, centralized: Path | None = None) -> Path:
    """Writes folder/report.html (and its PNGs); returns its path."""
    folder = Path(folder)
    if centralized is not None and not (centralized / "final_model.npz").exists():
        raise ReportError(f"--centralized {centralized}: no final_model.npz there (a `p2p-fl centralized --out` folder)")
    if (folder / "summary.json").exists() and (folder / "topology.toml").exists() and \
            "nodes" in json.loads((folder / "summary.json").read_text()):
        body = _run_report(folder, centralized)
    elif (folder / "results.csv").exists():
        body = _experiment_report(folder)
    elif (folder / "result.json").exists():
        result = json.loads((folder / "result.json").read_text())
        name = str(result.get("name", folder.name))
        body = f"<h1>{html.escape(name)}</h1>\n" + site_section(folder, result, folder, "")
        records = read_metrics(folder / "metrics.jsonl")
        if records:
            plot_learning_curves({name: records}, folder / "learning_curves.png")
            body += '\n<h2>Learning curves</h2><img src="learning_curves.png" alt="training loss and validation AUC">'
    else:
        raise ReportError(f"{folder}: neither a run (summary.json, topology.toml), an experiment (results.csv) "
                          "nor a site's finished run (result.json)")
    page = folder / "report.html"
    page.write_text("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>"
                    f"{html.escape(folder.name)}</title>{STYLE}</head><body>\n{body}\n{IMAGE_CHECK}\n</body></html>\n")
    return page


# A run.

def _run_report(folder: Path, centralized: Path | None) -> str:
    import tomllib

    summary = json.loads((folder / "summary.json").read_text())
    topology_text = (folder / "topology.toml").read_text()
    topology = tomllib.loads(topology_text)
    names = [p["name"] for p in topology["peers"]]
    metrics = {name: read_metrics(folder / name / "metrics.jsonl") for name in names}
    parts = [f"<h1>{html.escape(summary.get('federation', folder.name))}</h1>",
             f"<p>{html.escape(summary['protocol'])}, {summary['peers']} sites, partition "
             f"{html.escape(str(summary.get('partition')))}, seed {summary.get('seed')}, model "
             f"{html.escape(str(summary.get('model')))}, rounds {summary.get('rounds')} × local epochs "
             f"{summary.get('local_epochs')}; wall time {summary['wall_s']:.1f} s "
             f"(<code>{html.escape(str(folder))}</code>)</p>",
             "<h2>Results on the common test set</h2>", _results_table(summary)]

    parts.append("<h2>Learning curves</h2>")
    if any(metrics.values()):
        plot_learning_curves(metrics, folder / "learning_curves.png")
        parts.append('<img src="learning_curves.png" alt="training loss and validation AUC per round, per node">')
    else:
        parts.append('<p class="note">No metrics.jsonl records.</p>')

    parts.append("<h2>ROC curves of the final models</h2>")
    central_dir = centralized or find_centralized(folder, summary.get("seed"))
    curves, note = roc_curves(folder, topology, names, central_dir)
    if curves:
        plot_roc(curves, folder / "roc.png")
        parts.append('<img src="roc.png" alt="ROC curves of the final models">')
    parts.append(f'<p class="note">{html.escape(note)}</p>')

    parts.append("<h2>Each site</h2>")
    for node in summary.get("nodes", []):
        parts.append(f"<h3>{html.escape(node['name'])}</h3>")
        parts.append(site_section(folder / node["name"], node, folder, f"{node['name']}_"))

    parts.append("<h2>Communication</h2>")
    nodes = summary.get("nodes", [])
    if nodes:
        plot_communication(nodes, folder / "communication.png")
        parts.append(_communication_table(nodes))
        parts.append('<img src="communication.png" alt="megabytes sent and received per node">')
    parts.append("<h2>Configuration (topology.toml as run)</h2>")
    parts.append(f"<pre>{html.escape(topology_text, quote=False)}</pre>")
    return "\n".join(parts)


def site_section(site: Path, result: dict, page_dir: Path, prefix: str) -> str:
    """One site's part of a report (see the module doc); its plots go to page_dir/prefix*.png."""
    from p2p_fl.learn.metrics import (bootstrap_auc_interval, calibration_bins, confusion_matrix,
                                      expected_calibration_error)

    classes = result.get("classes") or [str(i) for i in range(result.get("num_classes", 2))]
    counts = result.get("class_counts") or []
    shape = "x".join(map(str, result.get("image_shape") or [])) or "?"
    test_set = result.get("test_set", "?")
    parts = [f"<p>Data: {html.escape(str(result.get('data', '?')))}, {result.get('samples')} training images of "
             f"{shape} ({', '.join(f'{html.escape(str(c))}: {n}' for c, n in zip(classes, counts)) or 'class counts not recorded'}); "
             f"model {html.escape(str(result.get('model', '?')))}; test set: "
             f"{'its own test split' if test_set == 'own' else html.escape(str(test_set))}.</p>"]
    predictions = site / "test_predictions.npz"
    if predictions.exists():
        with np.load(predictions) as saved:
            labels, probs = saved["labels"], saved["probs"]
        binary = probs.ndim == 1
        threshold = result.get("test_threshold") if binary else None
        if binary:
            low, high = bootstrap_auc_interval(labels, probs)
            predicted = (probs >= (0.5 if threshold is None else threshold)).astype(int)
        else:
            low = high = float("nan")
            predicted = probs.argmax(axis=1)
        parts.append(f"<p>AUC {_html_cell(result.get('test_auc'))} (95% bootstrap interval {_html_cell(low)} to "
                     f"{_html_cell(high)}, {len(labels)} test images); sensitivity "
                     f"{_html_cell(result.get('test_sens_at_val_threshold'))}, specificity "
                     f"{_html_cell(result.get('test_spec_at_val_threshold'))}, accuracy "
                     f"{_html_cell(result.get('test_acc_at_val_threshold'))} at the operating point "
                     f"{_html_cell(threshold)} (chosen on the site's validation data).</p>"
                     if binary else f"<p>{len(labels)} test images; accuracy {_html_cell(result.get('test_acc'))}.</p>")
        matrix = confusion_matrix(labels, predicted, len(classes))
        parts.append(html_table(["true \\ predicted", *classes],
                                [[c, *row.tolist()] for c, row in zip(classes, matrix)]))
        if binary:
            from p2p_fl.learn.metrics import roc_auc, roc_curve

            fpr, tpr, _ = roc_curve(labels, probs)
            plot_roc([(str(result.get("name", "site")), fpr, tpr, roc_auc(labels, probs))],
                     page_dir / f"{prefix}roc.png", title="ROC on this site's test set")
            bins = calibration_bins(labels, probs)
            plot_calibration(bins, page_dir / f"{prefix}calibration.png", classes[1])
            parts.append(f'<img src="{prefix}roc.png" alt="ROC of this site\'s final model" width="420">'
                         f'<img src="{prefix}calibration.png" alt="calibration of the predicted probabilities">'
                         f'<p class="note">Expected calibration error {expected_calibration_error(labels, probs):.3f} '
                         "(10 bins): how far predicted probabilities are from observed rates.</p>")
    else:
        parts.append('<p class="note">No test_predictions.npz: no confusion matrix, calibration or interval '
                     "(an ensemble, or a run of an older p2p-fl).</p>")
    records = read_metrics(site / "metrics.jsonl")
    trained = [r["round"] for r in records if r.get("train_loss") is not None]
    mixed = [f"{r['mixed_round']}: {r.get('survivors')}" for r in records if "mixed_round" in r]
    parts.append(f"<p>Trained rounds (hops for a ring): {', '.join(map(str, trained)) or 'none'}."
                 + (f" Neighbours in each mix (round: how many): {', '.join(mixed)}." if mixed else "")
                 + (f" <b>Ended without the federation: {html.escape(result['shortfall'])}</b>"
                    if result.get("shortfall") else "") + "</p>")
    return "\n".join(parts)


def read_metrics(path: Path) -> list[dict]:
    """The records of one node's metrics.jsonl (a missing file: none)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a killed node
    return records


def find_centralized(run: Path, seed) -> Path | None:
    """The centralized reference beside a run of an experiment, same seed first."""
    same_seed = run.parent / f"centralized-seed{seed}"
    candidates = [same_seed] + sorted(run.parent.glob("centralized-seed*"))
    for candidate in candidates:
        if (candidate / "final_model.npz").exists() and (candidate / "summary.json").exists():
            return candidate
    return None


def roc_curves(run: Path, topology: dict, names: list[str], central: Path | None) -> tuple[list, str]:
    """(label, fpr, tpr, auc) per distinct final model on the common test set, and a note."""
    from p2p_fl.data import load_dataset
    from p2p_fl.learn.metrics import roc_auc, roc_curve

    test_source = topology.get("data", {}).get("test", "")
    if not test_source:
        return [], "No common test set (data.test is empty): no ROC curves."
    model = topology.get("training", {}).get("model", "small-cnn")
    test = None
    curves = []
    for name in names:
        path = run / name / "final_model.npz"
        if not path.exists():
            continue
        if test is None:
            test = load_dataset(test_source)
            if test.num_classes != 2:
                return [], f"ROC curves are drawn for binary tasks only ({test.num_classes} classes)."
        probs = _probabilities(model, path, test.test.images)
        same = next((c for c in curves if np.array_equal(c[4], probs)), None)
        if same is not None:  # a ring's sites share one model: one curve, all their names
            curves[curves.index(same)] = (same[0] + [name],) + same[1:]
            continue
        fpr, tpr, _ = roc_curve(test.test.labels, probs)
        curves.append(([name], fpr, tpr, roc_auc(test.test.labels, probs), probs))
    labelled = [(_curve_label(sites, names), fpr, tpr, auc) for sites, fpr, tpr, auc, _ in curves]
    if not labelled:
        return [], "No final_model.npz in the site folders: no ROC curves."
    note = f"On the common test set {test_source} ({len(test.test)} images)."
    if central is None:
        return labelled, note + " No centralized reference found: pass --centralized DIR (a `p2p-fl centralized` folder)."
    summary = json.loads((central / "summary.json").read_text())
    probs = _probabilities(summary.get("model", model), central / "final_model.npz", test.test.images)
    fpr, tpr, _ = roc_curve(test.test.labels, probs)
    labelled.append((f"centralized ({summary.get('epochs')} epochs)", fpr, tpr, roc_auc(test.test.labels, probs)))
    return labelled, note + f" Centralized reference: {central}."


def _probabilities(model: str, weights_path: Path, images: np.ndarray) -> np.ndarray:
    """Positive-class probabilities of a saved model (the Learner, as the node evaluates)."""
    from p2p_fl.learn import Learner

    learner = Learner(model, num_classes=2, image_shape=images.shape[1:])
    learner.set_weights(dict(np.load(weights_path)))
    return learner.predict_proba(images)


def _curve_label(sites: list[str], names: list[str]) -> str:
    if len(sites) == len(names) and len(names) > 1:
        return "final model (every site)"
    return ", ".join(sites)


# Plots (matplotlib, no display).

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(metrics: dict[str, list[dict]], path: Path) -> None:
    plt = _pyplot()
    fig, (loss_ax, auc_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, records in metrics.items():
        trained = [r for r in records if r.get("train_loss") is not None]
        if trained:
            loss_ax.plot([r["round"] for r in trained], [r["train_loss"] for r in trained], "o-", ms=3, label=name)
        scored = [r for r in records if r.get("val_auc") is not None]
        if scored:
            auc_ax.plot([r["round"] for r in scored], [r["val_auc"] for r in scored], "o-", ms=3, label=name)
    loss_ax.set(title="training loss", xlabel="round (hop for a ring)", ylabel="loss")
    auc_ax.set(title="validation AUC (own validation data)", xlabel="round (hop for a ring)", ylabel="AUC")
    for ax in (loss_ax, auc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)  # rounds are whole
    _legend(auc_ax, len(metrics))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_roc(curves: list, path: Path, title: str = "ROC on the common test set") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for label, fpr, tpr, auc in curves:
        style = {"color": "black", "lw": 2, "ls": "--"} if label.startswith("centralized") else {}
        ax.plot(fpr, tpr, label=f"{label}: AUC {auc:.3f}", **style)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
           title=title)
    ax.grid(alpha=0.3)
    _legend(ax, len(curves), loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_calibration(bins: list[dict], path: Path, positive: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.plot([b["mean_predicted"] for b in bins], [b["observed"] for b in bins], "o-")
    for b in bins:
        ax.annotate(str(b["count"]), (b["mean_predicted"], b["observed"]), fontsize=7, xytext=(3, -9),
                    textcoords="offset points")
    ax.set(xlabel=f"predicted probability of {positive}", ylabel=f"observed rate of {positive}", xlim=(0, 1),
           ylim=(0, 1), title="calibration (images per bin)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_communication(nodes: list[dict], path: Path) -> None:
    plt = _pyplot()
    names = [n["name"] for n in nodes]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(names) + 2), 3.8))
    ax.bar(x - 0.2, [n.get("bytes_sent", 0) / 1e6 for n in nodes], 0.4, label="sent")
    ax.bar(x + 0.2, [n.get("bytes_received", 0) / 1e6 for n in nodes], 0.4, label="received")
    ax.set_xticks(x, names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    ax.set(ylabel="MB", title="bytes per node")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_experiment(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    labels = [f"{r['label']} {r['peers']} {r['partition']}" for r in rows]
    means = [_float(r.get("test_auc")) for r in rows]
    spread = [_float(r.get("test_auc_std")) or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows) + 2), 4.5))
    ax.bar(range(len(rows)), [m if m is not None else 0 for m in means], yerr=spread, capsize=3)
    low = min((m - s for m, s in zip(means, spread) if m is not None), default=0.5)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=8)
    ax.set(ylabel="test AUC (mean ± sd over seeds)", title="test AUC per configuration")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _legend(ax, count: int, loc: str = "best") -> None:
    if count <= 12:
        ax.legend(fontsize=7, loc=loc)


# Tables.

def _results_table(summary: dict) -> str:
    columns = ("node", "samples", "test loss", "acc@0.5", "AUC", "sens", "spec", "acc@val threshold",
               "site test AUC", "wall s")
    rows = [[n["name"], n.get("samples"), n.get("test_loss"), n.get("test_acc"), n.get("test_auc"),
             n.get("test_sens"), n.get("test_spec"), n.get("test_acc_at_val_threshold"),
             n.get("local_test_auc"), n.get("wall_s")] for n in summary.get("nodes", [])]
    f = summary.get("final", {})
    label = "final (mean of sites)" if summary["protocol"] in ("local", "gossip", "ensemble") else "final model"
    rows.append([label, "", f.get("test_loss"), f.get("test_acc"), f.get("test_auc"), f.get("test_sens"),
                 f.get("test_spec"), f.get("test_acc_at_val_threshold"), "", summary.get("wall_s")])
    return html_table(columns, rows)


def _communication_table(nodes: list[dict]) -> str:
    columns = ("node", "MB sent", "MB received", "messages sent", "dropped")
    rows = [[n["name"], n.get("bytes_sent", 0) / 1e6, n.get("bytes_received", 0) / 1e6, n.get("messages_sent"),
             ", ".join(f"{reason}: {count}" for reason, count in sorted((n.get("dropped") or {}).items())) or "none"]
            for n in nodes]
    return html_table(columns, rows)


def html_table(columns, rows) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_html_cell(v)}</td>" for v in row) + "</tr>\n" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"


def _html_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return html.escape(str(value))


# An experiment.

def _experiment_report(folder: Path) -> str:
    with (folder / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    parts = [f"<h1>Experiment {html.escape(folder.name)}</h1>"]
    markdown = folder / "results.md"
    if markdown.exists():
        parts += [f'<p class="note">{html.escape(line)}</p>' for line in markdown.read_text().splitlines()[:3]]
    metrics = (("test loss", "test_loss"), ("accuracy", "test_acc"), ("AUC", "test_auc"), ("rounds", "rounds"),
               ("wall s", "wall_s"), ("time reduction", "time_reduction"), ("site test acc", "local_test_acc"),
               ("site test AUC", "local_test_auc"))
    columns = ["configuration", "protocol", "sites", "partition", "seeds"] + [c for c, _ in metrics]
    table_rows = [[r["label"], r["protocol"], r["peers"], r["partition"], r["seeds"]]
                  + [_mean_sd(r.get(k), r.get(k + "_std"), DIGITS.get(k, 3)) for _, k in metrics] for r in rows]
    parts += ["<h2>Results (mean ± sd over seeds)</h2>", html_table(columns, table_rows)]
    plot_experiment(rows, folder / "auc_by_configuration.png")
    parts.append('<img src="auc_by_configuration.png" alt="test AUC per configuration">')
    runs = sorted(p for p in folder.iterdir() if (p / "summary.json").exists())
    links = "".join(f'<li><a href="{html.escape(p.name)}/{"report.html" if (p / "report.html").exists() else "summary.json"}">'
                    f"{html.escape(p.name)}</a></li>" for p in runs)
    parts += ["<h2>Runs</h2>", f"<ul>{links}</ul>",
              '<p class="note">A run\'s own report: <code>p2p-fl report RUN_FOLDER</code>.</p>']
    return "\n".join(parts)


DIGITS = {"rounds": 0, "wall_s": 0, "time_reduction": 2}


def _mean_sd(mean, sd, digits: int) -> str:
    m, s = _float(mean), _float(sd)
    if m is None:
        return "-"
    return f"{m:.{digits}f}" + ("" if s is None else f" ± {s:.{digits}f}")


def _float(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
