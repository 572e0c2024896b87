"""Preview montage: axial slices through the lesions, lung window, each lesion outlined and numbered.

Slices are shown the way a radiologist reads them whatever the file's voxel order: axial (the voxel
axis closest to world z, from the affine), the patient's right on the image's left, anterior at the
top, in-plane pixel spacing honoured, superior slices first.

The overlay and the caption are drawn from the report itself (:func:`lesion_descriptions`), so they
cannot disagree: the numbers are the report's lesion ids, pulmonary lesions and lesions outside the
lungs have their own colour (legend), and the caption lists each numbered lesion where the report puts it.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
# a bare Figure (no pyplot): no global figure registry to leak during a long batch, no GUI backend
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from nibabel.orientations import io_orientation

from ..data.io import atomic_path, spacing_from_affine
from ..transforms.intensity import window_range
from ..transforms.slicing import axial_axis, plane_index
from .report import label_lesions


PULMONARY, OUTSIDE, LUNG_OUTLINE = "#ff3030", "#30b0ff", "#60e070"  # overlay colours (legend)


def _where(les: dict) -> str:
    zone = les.get("zone")
    return f"{zone.replace('_', ' ')} lung" if zone else f"{les.get('side', '?')} lung"


def lesion_descriptions(report: dict) -> dict[int, tuple[bool, str]]:
    """Each lesion id of the report -> (in the lungs, its words), from the report's own two lists."""
    out = {int(les["id"]): (True, f"#{les['id']} {_where(les)}, {les['volume_ml']:.1f} mL") for les in report.get("lesions", [])}
    out.update({int(les["id"]): (False, f"#{les['id']} patient's {les.get('side', '?')} side, {les['volume_ml']:.1f} mL")
                for les in report.get("lesions_outside_lungs", [])})
    return out


def preview_caption(report: dict) -> str:
    """The report's finding, then its numbered lesions (pulmonary, then outside the lungs), what the model
    was trained on and every warning: the caption of the report's own preview."""
    described = lesion_descriptions(report)
    parts = [report.get("finding", "")]
    inside = [text for _, (in_lung, text) in sorted(described.items()) if in_lung]
    outside = [text for _, (in_lung, text) in sorted(described.items()) if not in_lung]
    if inside:
        parts.append("Pulmonary lesions: " + "; ".join(inside) + ".")
    if outside:
        parts.append("Outside the lungs (not in the finding): " + "; ".join(outside) + ".")
    if report.get("model_training_summary"):
        parts.append(f"[{report['model_training_summary']}]")
    return " ".join([*parts, *report.get("warnings", [])])


def _area_per_slice(instances: np.ndarray, box, axis: int, n_slices: int, ids) -> np.ndarray:
    """(len(ids), n_slices) cross-section area of each lesion on each axial slice."""
    other = tuple(a for a in range(3) if a != axis)
    area = np.zeros((len(ids), n_slices), dtype=np.int64)
    for row, i in enumerate(ids):
        area[row, box[axis]] = np.count_nonzero(instances == i, axis=other)
    return area


def pick_slices(instances: np.ndarray, box, axis: int, n_slices: int, n_panels: int, lung: np.ndarray | None = None) -> list[int]:
    """Axial indices to show: each lesion's largest cross-section (largest lesions first), then the
    slices holding the most lesion, then slices spread over the lung (or the scan) for context.
    ``instances``/``box`` are :func:`report.label_lesions`' output."""
    chosen: list[int] = []
    ids = list(range(1, int(instances.max()) + 1)) if box is not None and instances.size else []
    if ids:
        area = _area_per_slice(instances, box, axis, n_slices, ids[: 4 * n_panels])
        chosen += list(dict.fromkeys(int(k) for k in np.argmax(area, axis=1)))
        total = area.sum(axis=0)
        chosen += [int(k) for k in np.argsort(-total, kind="stable") if total[k] and int(k) not in chosen]
    if len(chosen) < n_panels:
        other = tuple(a for a in range(3) if a != axis)
        has_lung = lung is not None and np.any(lung)
        extent = np.flatnonzero(np.any(lung, axis=other)) if has_lung else np.arange(n_slices)
        spread = np.linspace(extent[0], extent[-1], min(n_panels, len(extent)) + 2)[1:-1].round().astype(int)
        chosen += [int(k) for k in spread if int(k) not in chosen][: n_panels - len(chosen)]
    return chosen[:n_panels]


def _display(plane: np.ndarray, in_plane: tuple[int, int], ornt: np.ndarray) -> np.ndarray:
    """A 2D slice (volume axes ``in_plane``) -> rows anterior->posterior, columns patient right->left."""
    a, b = in_plane
    if ornt[a, 0] != 1:  # make the voxel axis that runs along world y (io_orientation code 1) the rows
        plane, a, b = plane.T, b, a
    if ornt[a, 1] > 0:  # index grows anteriorly: flip so anterior is row 0
        plane = plane[::-1]
    if ornt[b, 1] > 0:  # index grows toward the patient's right: flip so right is on the image's left
        plane = plane[:, ::-1]
    return plane


def _instance_plane(instances: np.ndarray, box, shape, axis: int, k: int) -> np.ndarray:
    """Slice ``k`` of the full-size instance map, rebuilt from the bounding-box crop."""
    in_plane = [a for a in range(3) if a != axis]
    out = np.zeros([shape[a] for a in in_plane], dtype=np.int32)
    if box is not None and box[axis].start <= k < box[axis].stop:
        out[box[in_plane[0]], box[in_plane[1]]] = instances[plane_index(axis, k - box[axis].start)]
    return out


def legend_handles() -> list:
    """The legend of every preview: what each colour means."""
    from matplotlib.lines import Line2D

    return [Line2D([], [], color=PULMONARY, lw=2, label="pulmonary lesion (report #)"),
            Line2D([], [], color=OUTSIDE, lw=2, label="outside the lungs (not in the finding)"),
            Line2D([], [], color=LUNG_OUTLINE, lw=1, label="lung outline")]


def save_preview(
    path: str | os.PathLike,
    image: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    caption: str = "",
    *,
    title: str = "",
    lung: np.ndarray | None = None,
    n_panels: int = 6,
    columns: int = 3,
    window: str = "lung",
    min_voxels: int = 1,
    instances: np.ndarray | None = None,
    report: dict | None = None,
) -> Path:
    """Write the montage PNG atomically. Lesions are numbered as in the report (largest first);
    ``instances``: the report's labelling of ``mask``, when the caller has it (not labelled again).
    ``report``: the case's report, whose lesions give the colours and, unless ``caption`` is given, the
    caption (:func:`preview_caption`); without it every lesion is drawn as pulmonary."""
    affine = np.asarray(affine, dtype=np.float64)
    axis = axial_axis(affine)
    ornt = io_orientation(affine)
    in_plane = tuple(a for a in range(3) if a != axis)
    spacing = np.asarray(spacing_from_affine(affine))
    instances, box = label_lesions(mask, min_voxels, instances, affine)
    described = lesion_descriptions(report) if report is not None else {}
    outside_ids = [i for i, (in_lung, _) in described.items() if not in_lung]
    if report is not None and not caption:
        caption = preview_caption(report)
    centre = (np.array(image.shape) - 1) / 2.0

    def slice_z(k: int) -> float:  # world z of the slice's centre
        voxel = centre.copy()
        voxel[axis] = k
        return float(affine[2, :3] @ voxel + affine[2, 3])

    slices = sorted(pick_slices(instances, box, axis, image.shape[axis], n_panels, lung), key=slice_z, reverse=True)
    lo, hi = window_range(window)
    row_axis = next(a for a in in_plane if ornt[a, 0] == 1)  # after _display rows run along world y
    col_axis = next(a for a in in_plane if a != row_axis)
    aspect = spacing[row_axis] / spacing[col_axis]

    rows = max(1, -(-len(slices) // columns))
    cols = min(columns, max(1, len(slices)))
    width, height = max(3.2 * cols, 6.4), 3.2 * rows + 1.1
    fig = Figure(figsize=(width, height), facecolor="black")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, k in zip(axes.ravel(), slices):
        plane = _display(image[plane_index(axis, k)], in_plane, ornt)
        inst = _display(_instance_plane(instances, box, image.shape, axis, k), in_plane, ornt)
        ax.imshow(plane, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        if lung is not None and np.any(lung[plane_index(axis, k)]):
            ax.contour(_display(np.asarray(lung[plane_index(axis, k)]) > 0, in_plane, ornt), levels=[0.5],
                       colors=LUNG_OUTLINE, linewidths=0.6)
        elsewhere = np.isin(inst, outside_ids)
        for region, colour in (((inst > 0) & ~elsewhere, PULMONARY), (elsewhere, OUTSIDE)):
            if region.any():
                # a faint fill keeps one-voxel lesions visible, where an outline has nothing to go round
                ax.imshow(np.ma.masked_equal(region, False), cmap=ListedColormap([colour]), alpha=0.3, aspect=aspect,
                          interpolation="nearest")
                ax.contour(region, levels=[0.5], colors=colour, linewidths=1.0)
        # each lesion's report id just above its topmost voxel, so the number hides no lesion
        for i in np.unique(inst[inst > 0]):
            r, c = np.argwhere(inst == i)[0]
            ax.text(c + 1, r - 1, str(i), color=OUTSIDE if i in outside_ids else "yellow", fontsize=8, ha="left",
                    va="bottom", fontweight="bold")
        ax.set_title(f"slice {k}   z {slice_z(k):+.0f} mm", color="white", fontsize=8)
        for text, x, y in (("R", 0.03, 0.5), ("L", 0.97, 0.5), ("A", 0.5, 0.96)):
            ax.text(x, y, text, color="#80c0ff", fontsize=8, ha="center", va="center", transform=ax.transAxes)
    fig.text(0.01, 0.995, f"{title}    {window} window W{hi - lo:.0f} L{(hi + lo) / 2:.0f}", color="white",
             fontsize=9, va="top")
    fig.legend(handles=legend_handles(), loc="upper right", fontsize=7, ncol=3, frameon=False, labelcolor="white",
               bbox_to_anchor=(0.99, 1.0))
    fig.text(0.01, 0.005, "\n".join(textwrap.wrap(caption, int(width * 13))), color="white", fontsize=9, va="bottom")
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.5 / height, bottom=0.75 / height, wspace=0.03, hspace=0.12)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, facecolor="black")
    return Path(path)
