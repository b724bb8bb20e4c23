"""PNG plots of the result documents (matplotlib, no display needed)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict], x_key: str, metric: str, group=lambda r: r["system"],
            center: str = "median") -> dict:
    """{group: ([x], [center], [min], [max])} sorted by x, rows with the metric only;
    ``center="mean"`` (for accuracies) drops the min–max bars."""
    pts = defaultdict(list)
    for r in rows:
        if "error" not in r and metric in r.get("metrics", {}) and r.get(x_key) is not None:
            s = r["metrics"][metric]
            c = s[center]
            lo, hi = (s["min"], s["max"]) if center == "median" else (c, c)
            pts[group(r)].append((r[x_key], c, lo, hi))
    return {g: tuple(map(list, zip(*sorted(p)))) for g, p in pts.items()}


def _line(ax, series: dict, labels: dict) -> None:
    for name, (x, med, lo, hi) in series.items():
        err = [[m - a for m, a in zip(med, lo)], [b - m for m, b in zip(med, hi)]]
        ax.errorbar(x, med, yerr=err, marker="o", capsize=3, label=labels.get(name, name))


def _trained(ax, doc: dict) -> None:
    trained = doc["model"].get("trained_context")
    if trained:
        ax.axvline(trained, color="grey", linestyle=":", linewidth=1)
        ax.text(trained, ax.get_ylim()[1], " trained context\n (beyond: speed only)",
                fontsize=7, va="top", color="grey")


def _labels(doc: dict) -> dict:
    return {k: v.get("label", k) for k, v in doc["systems"].items()}


def decode_plot(doc: dict, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _line(ax, _series([r for r in doc["rows"] if r["batch"] == 1], "context", "decode_ms"),
          _labels(doc))
    ax.set(xscale="log", xlabel="context (tokens)", ylabel="decode ms / token",
           title=f"Decode latency, {doc['model']['name']}, {doc['machine']['threads']} threads")
    ax.set_xscale("log", base=2)
    _trained(ax, doc)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def prefill_plot(doc: dict, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _line(ax, _series(doc["rows"], "context", "prefill_tok_s"), _labels(doc))
    ax.set_xscale("log", base=2)
    ax.set(xlabel="context (tokens)", ylabel="prefill tokens / s", title="Prefill throughput")
    _trained(ax, doc)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def fidelity_plot(doc: dict, path: Path) -> Path:
    plt = _plt()
    tests = [("needle", "accuracy", "passkey accuracy (mean over depths)"),
             ("attention_error", "attention_error", "attention-output error"),
             ("perplexity", "perplexity_delta", "perplexity Δ vs exact")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    labels = _labels(doc)
    for ax, (test, metric, title) in zip(axes, tests):
        rows = [r for r in doc["rows"] if r["test"] in (test, f"{test}_matched")
                and r.get("fraction") is not None]

        def group(r):
            ctx = "" if test == "needle" else f" @{r['context']}"
            return labels.get(r["system"], r["system"]) + ctx

        center = "mean" if test == "needle" else "median"
        _line(ax, _series(rows, "kv_fraction", metric, group, center), {})
        ax.set(xlabel="fraction of KV read per step", ylabel=title, title=title)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=6)
    fig.suptitle("Fidelity against fraction of KV touched")
    return _save(fig, path)


def memory_plot(doc: dict, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    labels = _labels(doc)
    for ax, (metric, title) in zip(axes, [("device_kv_bytes", "KV on the device"),
                                          ("host_kv_bytes", "KV on the host"),
                                          ("peak_rss_bytes", "peak RSS (process)")]):
        series = {k: (x, *([v / 2**20 for v in ys] for ys in rest))
                  for k, (x, *rest) in _series(doc["rows"], "context", metric).items()}
        _line(ax, series, labels)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="context (tokens)", ylabel="MiB", title=title)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=6)
    fig.suptitle("Memory against context")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


PLOTS = {"decode": decode_plot, "prefill": prefill_plot, "fidelity": fidelity_plot,
         "memory": memory_plot}


def plot_all(docs: dict, out_dir: Path) -> list[Path]:
    """One PNG per workload present: ``<workload>.png`` in ``out_dir``."""
    return [fn(docs[name], Path(out_dir) / f"{name}.png") for name, fn in PLOTS.items()
            if name in docs]
