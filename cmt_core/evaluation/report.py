"""The evaluation report: ``report.md`` (results table, run info, figures), ``metrics.json`` and PNG figures.

Numbers are rounded once to ``SIGNIFICANT_DIGITS`` significant digits; ``metrics.json`` stores the rounded
values and ``report.md`` prints them with the same format, so both show the same numbers. The table's columns are
the rows' metrics (a conditional run's class metrics beside the Frechet distance); the training curves draw the
higher-is-better metrics (``class_accuracy``, in percent) apart from the distances.
"""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from cmt_core.evaluation.evaluator import HIGHER_IS_BETTER  # noqa: E402

SIGNIFICANT_DIGITS = 4
MAX_GRID_IMAGES = 64
MIN_CELL_PIXELS = 48  # small images (8x8 digits) are upscaled so the grid is readable


def round_number(v):
    """Floats -> ``SIGNIFICANT_DIGITS`` significant digits (non-finite -> None); other values unchanged."""
    if isinstance(v, bool) or not isinstance(v, float):
        return v
    return float(f"{v:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(v) else None


def format_cell(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{SIGNIFICANT_DIGITS}g}"
    return str(v).replace("|", "\\|")


def _json_safe(v):
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if hasattr(v, "item") and not isinstance(v, torch.Tensor):  # numpy scalars
        v = v.item()
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    if isinstance(v, float):
        return round_number(v)
    return str(v)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "figure"


def markdown_table(rows: list[dict]) -> str:
    """Rows -> a markdown table whose columns are the keys in order of first appearance (blank where missing)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row[c]) if c in row else "" for c in columns) + " |")
    return "\n".join(lines)


def grid_cells(samples: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The cells of a sample grid: the first ``MAX_GRID_IMAGES`` images ``(N, C, H, W)`` in [-1, 1] clamped, mapped to
    [0, 1] and enlarged ``scale`` times (nearest neighbour) to at least ``MIN_CELL_PIXELS``; and ``scale``."""
    images = samples[:MAX_GRID_IMAGES].clamp(-1, 1) * 0.5 + 0.5
    scale = max(1, math.ceil(MIN_CELL_PIXELS / images.shape[-1]))
    return torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest"), scale


def save_sample_figure(path: Path, samples: torch.Tensor, title: str) -> None:
    """Images ``(N, C, H, W)`` in [-1, 1] tiled in a grid, first ``MAX_GRID_IMAGES``; points ``(N, 2)`` scattered."""
    samples = samples.detach().cpu().float()
    fig, ax = plt.subplots(figsize=(5, 5))
    if samples.ndim == 4:
        from torchvision.utils import make_grid  # the [fid] extra; 2-D runs draw scatter plots without it

        images, scale = grid_cells(samples)
        grid = make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=scale, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.axis("off")
    elif samples.ndim == 2 and samples.shape[1] == 2:
        ax.scatter(samples[:, 0].numpy(), samples[:, 1].numpy(), s=2, alpha=0.5, linewidths=0)
        ax.set_aspect("equal")
    else:
        plt.close(fig)
        raise ValueError(f"cannot draw samples of shape {tuple(samples.shape)}: need (N, C, H, W) or (N, 2)")
    ax.set_title(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def save_curve_figure(path: Path, rows: list[dict], title: str) -> None:
    """Training log rows (``step``, ``loss``, optional ``eval_<metric>_1step`` / ``eval_<metric>_2step``) -> loss
    vs step and, if any, the 1-step and 2-step metrics vs step: the lower-is-better ones in one panel, the
    higher-is-better ones (``HIGHER_IS_BETTER``) in another."""
    # eval_score_* repeat the metric that selects checkpoints under another name
    eval_keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith("eval_")
                                   and k.endswith(("_1step", "_2step")) and not k.startswith("eval_score_")))
    higher = [k for k in eval_keys if k.removeprefix("eval_").rsplit("_", 1)[0] in HIGHER_IS_BETTER]
    panels = [(name, keys) for name, keys in (("evaluation", [k for k in eval_keys if k not in higher]),
                                              ("evaluation, higher is better", higher)) if keys]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(5 * (1 + len(panels)), 4), squeeze=False)
    loss_rows = [r for r in rows if r.get("loss") is not None]
    ax = axes[0, 0]
    ax.plot([r["step"] for r in loss_rows], [r["loss"] for r in loss_rows])
    if loss_rows and all(r["loss"] > 0 for r in loss_rows):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{title}: loss")
    for ax, (name, keys) in zip(axes[0, 1:], panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=k.removeprefix("eval_"))
        ax.set_xlabel("step")
        ax.set_title(f"{title}: {name}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out_dir: str | Path, rows: list[dict], grids: dict[str, torch.Tensor],
                 curves: dict[str, list[dict]], info: dict, keys: list[str] | None = None) -> dict:
    """Write ``report.md``, ``metrics.json`` and the figures into ``out_dir``; return what ``metrics.json`` holds.

    ``rows``: the results table, one dict per model (the data floor included), e.g.
    ``{"model": "teacher (Heun, 35 NFE)", "NFE": 35, "FD-digits": 1.23}``. ``grids``: samples per model,
    ``(N, C, H, W)`` in [-1, 1] or ``(N, 2)``. ``curves``: per stage, the JSONL rows of its training log.
    ``info``: device, number of samples, extractor, seconds per stage, ... (shown as a list). ``keys``: a short
    name per row (e.g. ``midtrain_2step``); ``metrics.json`` then also maps each name to its row (``by_key``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"samples": {}, "curves": {}}
    for name, samples in grids.items():
        figures["samples"][name] = f"samples_{_slug(name)}.png"
        save_sample_figure(out / figures["samples"][name], samples, name)
    for stage, log_rows in curves.items():
        figures["curves"][stage] = f"curves_{_slug(stage)}.png"
        save_curve_figure(out / figures["curves"][stage], log_rows, stage)

    metrics = {"rows": [_json_safe(r) for r in rows], "info": _json_safe(info), "figures": figures}
    if keys is not None:
        metrics["by_key"] = dict(zip(keys, metrics["rows"], strict=True))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    lines = ["# Evaluation report", "", "## Results", "", markdown_table(metrics["rows"]), "", "## Run", ""]
    lines += _info_lines(metrics["info"])
    if figures["samples"]:
        lines += ["", "## Samples", ""] + [f"![{n}]({f})" for n, f in figures["samples"].items()]
    if figures["curves"]:
        lines += ["", "## Training curves", ""] + [f"![{s}]({f})" for s, f in figures["curves"].items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return metrics


def _info_lines(info: dict, indent: str = "") -> list[str]:
    lines = []
    for k, v in info.items():
        if isinstance(v, dict):
            lines.append(f"{indent}- {k}:")
            lines += _info_lines(v, indent + "  ")
        else:
            lines.append(f"{indent}- {k}: {format_cell(v)}")
    return lines


def png_data_url(path: str | Path) -> str:
    """A PNG file as ``data:image/png;base64,...`` for embedding in HTML / markdown artifacts."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
