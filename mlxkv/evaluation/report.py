"""The eval results as a Markdown table, JSON, and PNG plots (quality against KV bytes,
passkey heatmaps; plots need matplotlib: ``pip install 'mlxkv[plot]'``)."""

from __future__ import annotations

import json
from dataclasses import asdict

from ..errors import InputError
from .metrics import EvalRow


def markdown_table(rows: list[EvalRow]) -> str:
    lines = ["| config | bits/element | KV MB | perplexity | Δ ppl | KLD | top-1 | passkey |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        acc = r.passkey_accuracy
        lines.append(f"| {r.config} | {r.bits_per_element:.2f} | {r.kv_bytes / 1e6:.2f} | "
                     f"{r.ppl:.2f} | {r.ppl_delta_pct:+.2f}% | {r.kld:.4f} | {100 * r.top1:.1f}% | "
                     f"{'-' if acc is None else f'{100 * acc:.0f}%'} |")
    return "\n".join(lines)


def write_json(path: str, rows: list[EvalRow], meta: dict) -> None:
    doc = {**meta, "rows": [{**asdict(r), "passkey_accuracy": r.passkey_accuracy} for r in rows]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def plot(rows: list[EvalRow], prefix: str) -> list[str]:
    """quality vs KV bytes, and a passkey heatmap per config: PNG files (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        raise InputError("plots need matplotlib: pip install 'mlxkv[plot]'") from None
    files = []
    fig, ax = plt.subplots(figsize=(9, 5))
    markers = "osD^v<>Pp*hX"
    for i, r in enumerate(rows):
        ax.scatter(r.kv_bytes / 1e6, r.ppl_delta_pct, marker=markers[i % len(markers)],
                   label=r.config)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("KV cache (MB, log scale)")
    ax.set_ylabel("perplexity vs full cache (%, symlog)")
    ax.set_title("Quality vs KV memory")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    files.append(f"{prefix}-quality.png")
    fig.savefig(files[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    with_keys = [r for r in rows if r.passkey]
    if with_keys:
        cells = list(with_keys[0].passkey)
        lengths = sorted({int(c.split("@")[0]) for c in cells})
        depths = sorted({int(c.split("@")[1]) for c in cells})
        cols = min(4, len(with_keys))
        nrows = -(-len(with_keys) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
        for ax in axes.flat[len(with_keys):]:
            ax.axis("off")
        for ax, r in zip(axes.flat, with_keys):
            grid = [[r.passkey.get(f"{L}@{d}", float("nan")) for L in lengths] for d in depths]
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths], fontsize=7)
            ax.set_title(r.config, fontsize=8)
        fig.suptitle("Passkey accuracy (x: length, y: depth)", y=1.04)
        files.append(f"{prefix}-passkey.png")
        fig.savefig(files[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return files
