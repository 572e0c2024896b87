"""Evaluation panels: the image, ground truth vs prediction outlined, reference vs generated sentence."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: panels are written, never shown
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_panel(path: str | os.PathLike, image: np.ndarray, label: np.ndarray | None, pred: np.ndarray | None,
               reference: str = "", generated: str = "", dice: float | None = None) -> None:
    """Write a 3-view PNG (image | ground truth in green | prediction in red) with both sentences."""
    path = Path(path)
    views = [("image", None, None), ("ground truth", label, "lime"), ("prediction", pred, "red")]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.6))
    for ax, (title, mask, colour) in zip(axes, views):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        if mask is not None and np.asarray(mask).any():
            ax.contour(np.asarray(mask) > 0.5, levels=[0.5], colors=colour, linewidths=1.2)
        ax.set_title(title + (f" (Dice {dice:.3f})" if title == "prediction" and dice is not None else ""), fontsize=9)
        ax.axis("off")
    fig.text(0.01, 0.08, f"reference: {reference}", fontsize=8, color="darkgreen", wrap=True)
    fig.text(0.01, 0.02, f"generated: {generated}", fontsize=8, color="darkred", wrap=True)
    fig.subplots_adjust(bottom=0.18, top=0.9, wspace=0.03)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def save_prompt_panel(path: str | os.PathLike, image: np.ndarray, label: np.ndarray, coarse: np.ndarray,
                      points: np.ndarray, final: np.ndarray, text: str = "") -> None:
    """A prompt-generating model's panel (LAPFT): coarse mask probability, the chosen points over the
    image, and the final mask (red) against the ground truth (green), with the guide sentence."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.6))
    axes[0].imshow(coarse, cmap="magma", vmin=0, vmax=1)
    axes[0].set_title("coarse mask M", fontsize=9)
    axes[1].imshow(image, cmap="gray", vmin=0, vmax=1)
    if len(points):
        axes[1].scatter(np.asarray(points)[:, 1], np.asarray(points)[:, 0], c="yellow", s=30, marker="x")
    axes[1].set_title(f"point prompts ({len(points)})", fontsize=9)
    axes[2].imshow(image, cmap="gray", vmin=0, vmax=1)
    for mask, colour in ((label, "lime"), (final, "red")):
        if np.asarray(mask).any():
            axes[2].contour(np.asarray(mask) > 0.5, levels=[0.5], colors=colour, linewidths=1.2)
    axes[2].set_title("final mask (red) vs truth (green)", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.text(0.01, 0.03, f"guide: {text}", fontsize=8, wrap=True)
    fig.subplots_adjust(bottom=0.14, top=0.9, wspace=0.03)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def save_sentence_grid(path: str | os.PathLike, items: list[dict], columns: int = 4) -> None:
    """Slices beside the sentences derived from their masks: the lung's zones tinted (patient right lung
    blue, left lung orange; darker = lower), the lesion outlined in red, the case, level and sentence under
    each. ``items``: dicts with ``image`` (1 x H x W, 0-255), ``label``, ``lung_zones``, ``text``,
    ``case_id``, ``slice_index``, ``slices_in_case``."""
    from ..data.io import atomic_path
    from ..vocab import ZONES

    rows = -(-len(items) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.9 * rows), squeeze=False)
    tint = np.zeros((len(ZONES) + 1, 4))
    for code, zone in enumerate(ZONES, start=1):
        level, side = zone.split("_")
        alpha = {"upper": 0.15, "middle": 0.25, "lower": 0.35}[level]
        tint[code] = (0.2, 0.4, 1.0, alpha) if side == "right" else (1.0, 0.55, 0.1, alpha)
    for ax, item in zip(axes.ravel(), items):
        ax.imshow(np.asarray(item["image"])[0], cmap="gray", vmin=0, vmax=255)
        ax.imshow(tint[np.asarray(item["lung_zones"])[0].astype(int)])
        label = np.asarray(item["label"])[0] > 127
        if label.any():
            ax.contour(label, levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(f"{item['case_id']} slice {item['slice_index'] + 1}/{item['slices_in_case']}", fontsize=8)
        ax.text(0.5, -0.02, textwrap.fill(item["text"], 44), transform=ax.transAxes, ha="center", va="top", fontsize=7)
        ax.axis("off")
    for ax in axes.ravel()[len(items):]:
        ax.axis("off")
    fig.subplots_adjust(hspace=0.35, wspace=0.05, left=0.01, right=0.99, top=0.97, bottom=0.03)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=64)
    plt.close(fig)
