"""The eval results as a Markdown table, JSON, and PNG plots (quality against bits,
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


def family(config: str) -> str | None:
    """The line a config belongs to on the frontier plot (None: a point of its own):
    mlx-lm's quantized caches, mlxkv's affine ones, its codebook ones, and its codebook
    ones with a middle of the same bits (bits by token age)."""
    if config.startswith("mlx-lm Quantized"):
        return "mlx-lm affine"
    words = config.replace(",", "").split()
    if "codebook" in words and "middle" in words:  # "..., N-bit middle M"
        return f"mlxkv codebook + {words[words.index('middle') - 1]} middle"
    if len(words) == 3 and words[2] == "codebook" and words[1].endswith("-bit"):  # same K, V bits
        return "mlxkv codebook"
    if (len(words) in (2, 3) and words[0] == "mlxkv" and words[1].endswith("-bit")
            and words[2:] in ([], ["rotated"])):
        return "mlxkv affine" + (" rotated" if "rotated" in words else "")
    return None


def quality_plot(rows: list[EvalRow], path: str, plt) -> str:
    """Perplexity change against bits per element: one line per family (``family``),
    other configs as points; axes padded so no point sits on an edge."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    lines: dict[str, list[EvalRow]] = {}
    points = []
    for r in rows:
        (lines.setdefault(family(r.config), []) if family(r.config) else points).append(r)
    for name, members in sorted(lines.items()):
        members.sort(key=lambda r: r.bits_per_element)
        ax.plot([r.bits_per_element for r in members], [r.ppl_delta_pct for r in members],
                marker="o", label=name)
        for r in members:
            ax.annotate(r.config.replace("mlxkv ", "").replace("mlx-lm ", ""),
                        (r.bits_per_element, r.ppl_delta_pct), fontsize=6,
                        textcoords="offset points", xytext=(4, 4))
    markers = "sD^v<>Pp*hX"
    for i, r in enumerate(points):
        ax.scatter(r.bits_per_element, r.ppl_delta_pct, marker=markers[i % len(markers)],
                   label=r.config)
    xs = [r.bits_per_element for r in rows]
    ys = [r.ppl_delta_pct for r in rows]
    ax.set_xscale("log", base=2)
    ax.set_xlim(min(xs) / 1.25, max(xs) * 1.25)
    ax.set_yscale("symlog", linthresh=1.0)
    top = max(max(ys), 1.0)
    ax.set_ylim(min(min(ys), 0.0) - 0.5, top * 1.6 + 1)
    ax.set_xlabel("bits per element (everything stored; log scale)")
    ax.set_ylabel("perplexity vs full cache (%, symlog)")
    ax.set_title("Quality against bits per element")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot(rows: list[EvalRow], prefix: str) -> list[str]:
    """The quality frontier (perplexity change against bits per element) and a passkey
    heatmap per config: PNG files (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        raise InputError("plots need matplotlib: pip install 'mlxkv[plot]'") from None
    files = [quality_plot(rows, f"{prefix}-quality.png", plt)]
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
