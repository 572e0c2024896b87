"""The phantom's normal chest: body, fat, muscle, ribs and spine, mediastinum, lungs with vessels and
airways, in Hounsfield units, in canonical RAS voxel order (phantom.py stores it in the asked orientation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from ..vocab import LUNG_LABELS

# tissue codes of the in-memory tissue map (tests use it to check HU per tissue)
TISSUES = {"air": 0, "fat": 1, "soft tissue": 2, "lung": 3, "bone": 4, "airway": 5}


def _upsample2(f: np.ndarray, axis: int, n: int) -> np.ndarray:
    """Linear x2 upsampling along ``axis`` cropped to ``n`` samples (much faster than ndimage.zoom)."""
    out = np.repeat(f, 2, axis=axis)
    odd = [slice(None)] * f.ndim
    odd[axis] = slice(1, None, 2)
    out[tuple(odd)] = 0.5 * (f + np.roll(f, -1, axis=axis))
    return np.take(out, np.arange(n), axis=axis)


def _smooth_noise(rng: np.random.Generator, shape, sigma: Sequence[float]) -> np.ndarray:
    """Unit-variance smooth random field, filtered at half in-plane resolution then upsampled (speed)."""
    low = (-(-shape[0] // 2), -(-shape[1] // 2), shape[2])
    f = ndimage.gaussian_filter(rng.standard_normal(low).astype(np.float32), (sigma[0] / 2, sigma[1] / 2, sigma[2]))
    f = _upsample2(_upsample2(f, 0, shape[0]), 1, shape[1])
    return f / max(float(f.std()), 1e-6)


@dataclass
class _Anatomy:
    ct: np.ndarray  # float32 HU, canonical RAS voxel order (i -> patient right, j -> anterior, k -> superior)
    lung: np.ndarray  # uint8, 1 right / 2 left
    tissue: np.ndarray  # uint8 TISSUES codes
    depth: np.ndarray  # float32, 0 at each lung's centre axis -> 1 at its outline (for peripheral disease)
    body: np.ndarray  # bool


def _anatomy(rng: np.random.Generator, shape, spacing) -> _Anatomy:
    """Chest in canonical RAS voxel order; sizes are fractions of the field of view."""
    nx, ny, nz = shape
    fov = np.asarray(shape) * np.asarray(spacing)
    bx, by = rng.uniform(-0.02, 0.02, 2) * fov[:2]  # the patient is never exactly centred
    X = ((np.arange(nx) - (nx - 1) / 2) * spacing[0] - bx).astype(np.float32)[:, None, None]  # + = right
    Y = ((np.arange(ny) - (ny - 1) / 2) * spacing[1] - by).astype(np.float32)[None, :, None]  # + = anterior
    t = (np.arange(nz) / max(nz - 1, 1)).astype(np.float32)[None, None, :]  # 0 inferior .. 1 superior
    zmm = (np.arange(nz) * spacing[2]).astype(np.float32)[None, None, :]

    A = 0.44 * fov[0] * rng.uniform(0.96, 1.02)  # body half-width
    B = 0.34 * fov[1] * rng.uniform(0.95, 1.02)  # body half-depth
    fat = rng.uniform(0.05, 0.09) * B

    def superellipse(x, y, a, b, p=2.4):
        return (np.abs(x) / a) ** p + (np.abs(y) / b) ** p

    body = superellipse(X, Y, A, B) <= 1
    inner = superellipse(X, Y, A - fat, B - fat) <= 1
    ribcage = superellipse(X, Y, A - fat - 0.03 * B, B - fat - 0.03 * B) <= 1

    # mediastinum, heart and spine: the lungs fill the thoracic cavity around them
    mediastinum = (np.abs(X + 0.03 * A) < 0.11 * A + 0.05 * A * np.clip(-Y / B, 0, 1)) & inner
    heart = ((X + 0.1 * A) / (0.33 * A)) ** 2 + ((Y - 0.25 * B) / (0.45 * B)) ** 2 + ((t - 0.32) / 0.2) ** 2 <= 1
    spine_c = (0.0, -0.68 * B)
    r_vert = 0.13 * A
    vert = (X - spine_c[0]) ** 2 + (Y - spine_c[1]) ** 2 <= r_vert**2
    canal_c = spine_c[1] - r_vert - 0.06 * B
    canal = X**2 + (Y - canal_c) ** 2 <= (0.05 * B) ** 2
    arch = (X**2 + (Y - canal_c) ** 2 <= (0.09 * B) ** 2) & ~canal
    spinous = (np.abs(X) < 0.025 * A) & (Y < canal_c) & (Y > -0.97 * B)
    aorta_d = ((X + 0.14 * A) ** 2 + (Y + 0.45 * B) ** 2 <= (0.1 * B) ** 2) & (t < 0.78)
    cavity = superellipse(X, Y, A - fat - 0.09 * B, B - fat - 0.09 * B) <= 1
    carved = mediastinum | heart | vert | arch | spinous | aorta_d | ~cavity

    # each lung: the hemithorax, narrowing to the apex, above its diaphragm dome
    lung = np.zeros(shape, dtype=np.uint8)
    depth = np.ones(shape, dtype=np.float32)
    t_base, t_top = 0.08 + rng.uniform(0, 0.04), 0.97
    taper = np.sqrt(np.clip((t_top - t) / 0.3, 0.0, 1.0))
    for side, sign, dome in (("right", 1.0, 0.27), ("left", -1.0, 0.21)):  # the liver lifts the right dome
        cx, cy = sign * 0.5 * A, -0.08 * B
        q = ((X - cx) / (0.45 * A * taper + 1e-3)) ** 2 + ((Y - cy) / (0.88 * B * taper + 1e-3)) ** 2
        floor = t_base + dome * np.clip(1 - q, 0, 1) - 0.05 * np.clip(-Y / B, 0, 1)  # deeper posterior recess
        sel = (q <= 1) & (t > floor) & (t < t_top) & ~carved & (sign * X > 0)
        lung[sel] = LUNG_LABELS[side]
        depth[sel] = np.sqrt(q[sel])

    def tube(cx, cy, r, t0, t1):
        return ((X - cx) ** 2 + (Y - cy) ** 2 <= r**2) & (t >= t0) & (t <= t1)

    vessels = (
        tube(0.06 * A, 0.25 * B, 0.11 * B, 0.45, 0.76)  # ascending aorta
        | tube(-0.09 * A, 0.3 * B, 0.1 * B, 0.5, 0.62)  # pulmonary trunk
        | ((np.abs(X + 0.03 * A) < 0.12 * A) & (np.abs(Y + 0.1 * B) < 0.35 * B) & (np.abs(t - 0.78) < 0.025))  # arch
    )
    trachea = tube(0.0, -0.22 * B, 0.07 * B, 0.62, 1.0)
    bronchi = np.zeros_like(trachea)
    for sign in (1.0, -1.0):  # main bronchi run from the carina to each hilum
        along = np.clip((0.62 - t) / 0.1, 0, 1)
        bronchi |= ((X - sign * along * 0.3 * A) ** 2 + (Y + 0.2 * B) ** 2 <= (0.05 * B) ** 2) & (t > 0.5) & (t < 0.63)
    airway = (trachea | bronchi) & inner

    # ribs: sections of a ring inside the chest wall, rotating with height as oblique ribs do
    theta = np.arctan2(Y, X)
    ring = ribcage & ~(superellipse(X, Y, A - fat - 0.085 * B, B - fat - 0.085 * B) <= 1)
    ribs = ring & (np.cos(7 * theta + 2 * np.pi * 3.2 * t) > 0.45) & (t > 0.1) & (np.abs(np.sin(theta)) < 0.97)
    sternum = (np.abs(X) < 0.06 * A) & (Y > B - fat - 0.12 * B) & (Y < B - fat) & (t > 0.3)
    disc = (zmm % 26.0) < 5.0  # intervertebral discs every ~26 mm
    cortex = vert & ~((X - spine_c[0]) ** 2 + (Y - spine_c[1]) ** 2 <= (r_vert - 2.5) ** 2)

    ct = np.full(shape, -1000.0, dtype=np.float32)
    tissue = np.zeros(shape, dtype=np.uint8)

    def paint(region, hu, code):
        np.copyto(ct, hu, where=region)  # broadcasts 2D regions along z without index arrays
        np.copyto(tissue, TISSUES[code], where=region)

    paint(body, -100.0, "fat")
    paint(inner, 45.0, "soft tissue")
    paint(mediastinum & inner & (t > 0.15), -90.0, "fat")
    paint((heart | vessels | aorta_d) & inner, 40.0, "soft tissue")
    below = inner & (lung == 0) & (t < t_base + 0.3) & ~mediastinum  # upper abdomen: liver right
    paint(below & (X > -0.15 * A), 60.0, "soft tissue")
    paint(airway, -1000.0, "airway")
    paint(vert, np.where(disc, 80.0, 420.0), "bone")
    paint(cortex & ~disc, 900.0, "bone")
    paint(arch | spinous, 750.0, "bone")
    paint(canal & inner, 15.0, "soft tissue")
    paint(ribs | (sternum & inner), 700.0, "bone")

    # lung parenchyma (denser posteriorly, as gravity does) with vessels from two crossing noise fields
    in_lung = lung > 0
    paren = -875.0 + 40.0 * np.clip(-Y / B + 0.5, 0, 1.5)
    n1 = _smooth_noise(rng, shape, (3.0, 3.0, 0.8))
    n2 = _smooth_noise(rng, shape, (3.0, 3.0, 0.8))
    eps = 0.25 * (1.3 - depth)  # thicker, denser vessels near the hila
    vessel = in_lung & (np.abs(n1) < eps) & (np.abs(n2) < eps)
    np.copyto(ct, paren, where=in_lung)
    np.copyto(ct, 35.0, where=vessel)
    np.copyto(tissue, TISSUES["lung"], where=in_lung)
    # partial volume: soften in-plane edges a little, as a reconstruction kernel does
    ct = ndimage.gaussian_filter(ct, (0.6, 0.6, 0.0))
    return _Anatomy(ct=ct, lung=lung, tissue=tissue, depth=depth, body=np.broadcast_to(body, shape).copy())


