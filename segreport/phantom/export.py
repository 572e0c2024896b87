"""Files the phantom writes besides its NIfTI volumes: the LViT/MosMedData+ 2D export (PNG slices in the
one display orientation + text spreadsheets, byte-for-byte reproducible) and the preview picture."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from PIL import Image

from ..transforms.findings import FindingsFromMask
from ..transforms.lung_regions import lung_zone_map
from ..transforms.orientation import display_slices
from ..transforms.slicing import axial_axis
from ..data.io import atomic_path, spacing_from_affine

LUNG_WINDOW = (-1350.0, 150.0)  # W 1500 / L -600, as MosMedData+ slices are windowed
_FINDINGS = FindingsFromMask()


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _write_json(path: Path, obj) -> None:
    _write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def _write_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1)  # level 6 costs 4x the time


def _write_xlsx(path: Path, rows: Sequence[tuple[str, str]]) -> None:
    """LViT text sheet (Image, Description), byte-identical across runs (fixed zip and core dates)."""
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(("Image", "Description"))
    for row in rows:
        ws.append(row)
    with atomic_path(path) as tmp:
        wb.save(tmp)
        with zipfile.ZipFile(tmp) as z:
            members = [(info.filename, z.read(info.filename)) for info in z.infolist()]
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in members:
                if name == "docProps/core.xml":  # openpyxl stamps the save time here
                    data = _fixed_core_dates(data)
                z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)


def _fixed_core_dates(xml: bytes) -> bytes:
    import re

    return re.sub(rb"(<dcterms:(created|modified)[^>]*>)[^<]*", rb"\g<1>2000-01-01T00:00:00Z", xml)


def lung_window(ct: np.ndarray) -> np.ndarray:
    """8-bit lung-window image (W 1500 / L -600)."""
    lo, hi = LUNG_WINDOW
    return np.round(np.clip((ct.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _export_slices(case, folder: Path, slice_filter: str) -> list[tuple[str, str]]:
    """PNG slices (lung window / mask 0-255) of one case into ``folder``; returns (name, sentence) rows."""
    zone_map = lung_zone_map(case.lung, case.affine)  # zones of a slice come from its volume
    # the one display orientation of every 2D path (radiological: transforms.orientation)
    ct_shown, file_index = display_slices(case.ct, case.affine)
    label_shown, _ = display_slices(case.label, case.affine)
    axis = axial_axis(case.affine)
    rows = []
    for j, k in enumerate(file_index):
        label_k, lung_k = np.take(case.label, k, axis=axis), np.take(case.lung, k, axis=axis)
        keep = label_k.any() if slice_filter == "lesion" else lung_k.any()
        if not keep:
            continue
        text = _FINDINGS(label_k, affine=np.eye(4), zone_map=np.take(zone_map, k, axis=axis))
        name = f"{case.case_id}_s{k:03d}.png"  # k: index along the NIfTI's axial voxel axis
        _write_png(folder / "img" / name, lung_window(ct_shown[j]))
        _write_png(folder / "labelcol" / name, label_shown[j].astype(np.uint8) * np.uint8(255))
        rows.append((name, text))
    return rows


# ------------------------------------------------------------------------------------------ preview


_ZONE_COLOURS = np.array([  # upper/middle/lower left, then right: light blue-greens and warm tints
    [0.3, 0.6, 1.0], [0.3, 0.9, 0.6], [0.9, 0.9, 0.3], [0.8, 0.4, 1.0], [1.0, 0.6, 0.3], [0.4, 0.9, 0.9],
])  # fmt: skip


def render_preview(dataset_dir: str | os.PathLike, out_png: str | os.PathLike, case_id: str | None = None) -> Path:
    """A PNG of one case (default: the CT-1..CT-3 case with most lesions): three axial slices (upper/middle/lower
    lung) and a coronal one in a lung window, zones tinted, lesions outlined red, the finding as caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(dataset_dir)
    if case_id is None:
        metas = [json.loads(p.read_text()) for p in sorted((root / "cases").glob("*.json"))]
        if not metas:
            raise FileNotFoundError(f"{root}: no cases/*.json; is this a phantom dataset?")
        # a moderate case shows both lesions and normal lung (a CT-4 one is lesion almost everywhere);
        # among those, the one with most separate lesions gives most to look at
        moderate = [m for m in metas if m["severity"] in ("CT-1", "CT-2", "CT-3")] or metas
        case_id = max(moderate, key=lambda m: (m["n_areas"], len(m["zones"])))["case_id"]
    meta = json.loads((root / "cases" / f"{case_id}.json").read_text())
    img = nib.load(root / "imagesTr" / f"{case_id}.nii.gz")
    # view in RAS voxel order; display code below then only has to flip
    ornt = nib.orientations.io_orientation(img.affine)
    ras = [nib.orientations.apply_orientation(np.asarray(nib.load(root / f / f"{case_id}.nii.gz").dataobj), ornt)
           for f in ("imagesTr", "labelsTr", "lungsTr")]  # fmt: skip
    ct, label, lung = ras
    ras_affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape)
    zones = lung_zone_map(lung, ras_affine)
    sx, sy, sz = spacing_from_affine(ras_affine)

    ks = np.flatnonzero(lung.any(axis=(0, 1)))
    picks = [int(ks[int(len(ks) * f)]) for f in (0.8, 0.5, 0.2)] if ks.size else [ct.shape[2] // 2] * 3
    j = int(np.argmax(label.sum(axis=(0, 2)))) if label.any() else ct.shape[1] // 2

    def overlay(ax, gray, zone, les, aspect):
        ax.imshow(lung_window(gray), cmap="gray", aspect=aspect, interpolation="nearest")
        tint = np.zeros((*zone.shape, 4))
        tint[zone > 0, :3] = _ZONE_COLOURS[zone[zone > 0] - 1]
        tint[zone > 0, 3] = 0.15
        ax.imshow(tint, aspect=aspect, interpolation="nearest")
        if les.any():
            ax.contour(les, levels=[0.5], colors="red", linewidths=1.2)
        ax.set_xticks([]), ax.set_yticks([])
        ax.text(0.02, 0.5, "R", color="yellow", transform=ax.transAxes, fontsize=12, va="center")
        ax.text(0.95, 0.5, "L", color="yellow", transform=ax.transAxes, fontsize=12, va="center")

    fig, axes = plt.subplots(1, 4, figsize=(17, 4.9), gridspec_kw={"width_ratios": [1, 1, 1, 1.1]})
    fig.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=0.1, wspace=0.04)
    for ax, k, level in zip(axes[:3], picks, ("upper", "middle", "lower")):
        disp = [a[::-1, ::-1, k].T for a in (ct, zones, label)]  # anterior up, patient right on the left
        overlay(ax, *disp, aspect=sy / sx)
        ax.set_title(f"axial k={k} ({level} lung)")
    # coronal through the most lesioned row: superior up, patient right on the left
    cor = [a[::-1, j, ::-1].T for a in (ct, zones, label)]
    overlay(axes[3], *cor, aspect=sz / sx)
    axes[3].set_title(f"coronal j={j}")
    fig.suptitle(f"{case_id}  {meta['severity']} ({meta['lung_involvement_percent']:.1f}% of lung)  "
                 f"orientation {meta['orientation']}  spacing {meta['spacing']}", fontsize=11)  # fmt: skip
    fig.text(0.5, 0.025, meta["text"], ha="center", fontsize=12)
    out = Path(out_png)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out
