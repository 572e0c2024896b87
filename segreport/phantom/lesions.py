"""The phantom's lesions: what each type looks like (HU ranges, shapes, margins, texture), how they are
painted into the chest (focal lesions placed in a lung zone, diffuse peripheral ground glass), and how
their attributes are measured back from the final image (see the package docstring for the rules)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage
from scipy.special import expit

from ..transforms.findings import FindingsFromMask
from ..vocab import LUNG_LABELS
from .anatomy import _Anatomy, _smooth_noise
from .plan import Recipe

LESION_TYPES: tuple[str, ...] = ("ground-glass opacity", "consolidation", "nodule")
TYPE_HU: dict[str, tuple[float, float]] = {  # mean-HU range each type must land in
    "ground-glass opacity": (-600.0, -300.0),
    "consolidation": (-100.0, 50.0),
    "nodule": (-100.0, 600.0),
}
SOFT_TISSUE_HU = 40.0
DENSITY_MARGIN = 50.0
HETEROGENEITY_HU = 30.0
ILL_DEFINED_EDGE_RATIO = 0.35
SEVERITY_SHARE = {"CT-0": 0.15, "CT-1": 0.35, "CT-2": 0.25, "CT-3": 0.15, "CT-4": 0.10}
# lung-percentage targets for the diffuse cases, inside each severity bin
_DIFFUSE_PERCENT = {"CT-1": (5.0, 20.0), "CT-2": (30.0, 45.0), "CT-3": (55.0, 70.0), "CT-4": (78.0, 88.0)}
_CT1_DIFFUSE_CHANCE = 0.4  # other CT-1 cases only have focal lesions (well under 5 % of lung)
_MIN_LESION_VOXELS = 12
_FINDINGS = FindingsFromMask()


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


# ------------------------------------------------------------------------------------------ lesions


@dataclass
class _Lesion:
    """A lesion the generator meant to draw; measurement decides its final labels."""

    lesion_type: str
    shape: str
    heterogeneous: bool
    ill_defined: bool
    invasive: bool
    base_hu: float
    radius: float  # mm
    zone: int  # target zone code 1..6
    recipe: Recipe | None = None  # what a focal lesion was painted to show (diffuse disease: None)


def lesion_from_recipe(recipe: Recipe, rng: np.random.Generator, scale: float) -> _Lesion:
    """A lesion painted to show ``recipe``'s classes; its type follows from shape and density (hypodense:
    ground glass; hyperdense: a calcified nodule; a cavity's wall: consolidation); radii (mm) scale with
    the field of view."""
    shape, density = recipe.shape, recipe.density
    if density == "hypodense":
        kind, base = "ground-glass opacity", rng.uniform(-530, -390)
    elif density == "hyperdense":
        kind, base = "nodule", rng.uniform(220, 450)
    elif shape == "punctate/nodular" or (shape == "round-like" and rng.random() < 0.5):
        kind, base = "nodule", rng.uniform(30, 80)
    else:  # isodense consolidation, cavitating walls included: a partial-volume rim pulls the mean down
        kind, base = "consolidation", rng.uniform(15, 35)
    if shape == "punctate/nodular":
        radius = rng.uniform(3.5, 5.5)
    elif shape == "wall thickening":
        radius = rng.uniform(10, 16)
    elif kind == "nodule":
        radius = rng.uniform(6.0, 10.0)
    else:
        radius = rng.uniform(9, 20)
    zone = int(rng.integers(1, 7))
    return _Lesion(kind, shape, recipe.heterogeneous, recipe.ill_defined, recipe.invasive, float(base), float(radius * scale), zone, recipe)


def _sdf(les: _Lesion, rng: np.random.Generator, x, y, z) -> tuple[np.ndarray, np.ndarray | None]:
    """Approximate signed distance (mm, negative inside) of the lesion shape, and its cavity (if any)."""
    r = les.radius
    if les.shape == "irregular":  # lobulated: union of offset spheres
        d = None
        for _ in range(int(rng.integers(3, 6))):
            c = rng.uniform(-0.55, 0.55, 3) * r
            rk = rng.uniform(0.45, 0.75) * r
            dk = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) - rk
            d = dk if d is None else np.minimum(d, dk)
        return d, None
    radii = r * np.array([1.0, *rng.uniform(0.8, 1.2, 2)])
    outer = (np.sqrt((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2) - 1) * radii.min()
    if les.shape != "wall thickening":
        return outer, None
    wall = rng.uniform(0.3, 0.4) * r
    inner_r = radii - wall
    inner = (np.sqrt((x / inner_r[0]) ** 2 + (y / inner_r[1]) ** 2 + (z / inner_r[2]) ** 2) - 1) * inner_r.min()
    return np.maximum(outer, -inner), inner < 0


def _weight(d: np.ndarray, ill_defined: bool) -> np.ndarray:
    """Opacity from signed distance: a step (well-defined) or a sigmoid halo reaching past the mask."""
    if not ill_defined:
        return (d <= 0).astype(np.float32)
    s = 1.3  # mm; the mask edge sits at opacity 0.8, the halo fades over ~5 mm outside it
    return expit((s * np.log(4.0) - d) / s).astype(np.float32)


def _texture(rng: np.random.Generator, shape, heterogeneous: bool) -> np.ndarray:
    """Mottled HU texture (~75 HU spread, 1-2 voxel grain) for heterogeneous lesions, else zero."""
    if not heterogeneous:
        return np.zeros(shape, dtype=np.float32)
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (0.9, 0.9, 0.4))
    return 75.0 * field / max(float(field.std()), 1e-6)


def _blend(sub: np.ndarray, w: np.ndarray, les: _Lesion, texture, cavity=None) -> np.ndarray:
    """``sub`` with the lesion blended in at opacity ``w``; ground glass keeps the vessels it covers."""
    value = les.base_hu + texture
    if les.lesion_type == "ground-glass opacity":
        value = np.maximum(value, sub)
    out = sub * (1 - w) + value * w
    if cavity is not None:
        out[cavity & (w > 0)] = -990.0
    return out


def _fits(painted: np.ndarray, mask: np.ndarray, les: _Lesion) -> bool:
    """Whether the lesion's core mean (the rule of :func:`measure_lesion`) sits inside its type's HU range and,
    for a planned lesion, in its recipe's density class; 15 HU of margin for the noise added later."""
    core = ndimage.binary_erosion(mask)
    core = core if core.sum() >= 8 else mask
    mean = float(painted[core].mean())
    lo, hi = TYPE_HU[les.lesion_type]
    if not lo + 15 <= mean <= hi - 15:
        return False
    return les.recipe is None or density_class(mean - 15) == density_class(mean + 15) == les.recipe.density


def _place_focal(rng, an: _Anatomy, ct, gen, occupied, les: _Lesion, gen_id, spacing, zone_map, boundary) -> bool:
    """Try a few centres in the lesion's target zone; draw it at the first one that fits."""
    spacing = np.asarray(spacing)
    in_zone = np.flatnonzero((zone_map == les.zone) & (boundary if les.invasive else ~boundary))
    if in_zone.size == 0:
        return False
    for attempt in range(20):
        les_r = les.radius * (1.2 ** (attempt // 6))  # too few voxels on a coarse grid: grow
        centre = np.array(np.unravel_index(rng.choice(in_zone), zone_map.shape))
        halo = 6.0 if les.ill_defined else 1.5
        half = np.ceil((les_r * 1.3 + halo) / spacing).astype(int)
        lo, hi = np.maximum(centre - half, 0), np.minimum(centre + half + 1, zone_map.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        x, y, z = ((g - c) * s for g, c, s in zip(np.ogrid[box], centre, spacing))  # mm from the centre
        d, cavity = _sdf(replace(les, radius=les_r), rng, x, y, z)
        d = np.broadcast_to(d, tuple(hi - lo))
        cavity = None if cavity is None else np.broadcast_to(cavity, tuple(hi - lo))
        lung_box = an.lung[box] > 0
        mask = (d <= 0) & lung_box
        reach = d <= halo
        if mask.sum() < _MIN_LESION_VOXELS or (reach & occupied[box]).any():
            continue
        if not les.invasive and not lung_box[d <= min(spacing[:2]) * 1.5].all():
            continue  # a non-invasive lesion keeps a rim of lung around it
        w = _weight(d, les.ill_defined) * lung_box
        painted = _blend(ct[box], w, les, _texture(rng, w.shape, les.heterogeneous), cavity)
        if not _fits(painted, mask, les):
            continue  # a small blurred lesion is mostly rim: its mean slips out of its type's (or density's) range
        ct[box] = painted
        gen[box][mask & (gen[box] == 0)] = gen_id
        occupied[box] |= reach
        return True
    return False


def _paint_diffuse(rng, an: _Anatomy, ct, gen, occupied, percent: float, gen_id0: int, zone_map) -> list[_Lesion]:
    """Peripheral (subpleural, posterior-weighted) ground glass covering ``percent`` of the lungs."""
    lung = an.lung
    n_lung = int((lung > 0).sum())
    sides = ["right", "left"]
    if percent < 40 and rng.random() < 0.35:  # sometimes one lung only, when it can hold the volume
        side = sides[int(rng.integers(2))]
        if (lung == LUNG_LABELS[side]).sum() * 0.85 > percent / 100 * n_lung:
            sides = [side]
    side_voxels = sum(int((lung == LUNG_LABELS[s]).sum()) for s in sides)
    fraction = min(0.95, percent / 100 * n_lung / side_voxels)
    noise = _smooth_noise(rng, lung.shape, (4.0, 4.0, 1.2))
    y_post = np.linspace(1, 0, lung.shape[1], dtype=np.float32)[None, :, None]  # 1 = posterior
    made = []
    for i, side in enumerate(sides):
        box = ndimage.find_objects((lung == LUNG_LABELS[side]).astype(np.uint8))[0]  # work on this lung only
        sel = lung[box] == LUNG_LABELS[side]
        # which levels the disease favours: a run of 1-3 levels, all of them when it must be large
        n_levels = 3 if fraction > 0.6 else int(rng.integers(max(1, int(np.ceil(fraction * 3 / 0.75))), 4))
        first = int(rng.integers(0, 4 - n_levels))
        codes = np.arange(first, first + n_levels) + (1 if side == "left" else 4)
        off_level = ~np.isin(zone_map[box], codes)
        wobble = 0.08 * min(1.0, fraction / 0.3)  # a thin band would break up under full-size wobble
        score = an.depth[box] + 0.25 * y_post[:, box[1]] + wobble * noise[box] - 0.6 * off_level
        thr = np.quantile(score[sel], 1 - fraction)
        d = np.where(sel, (thr - score) * 45.0, 1e3).astype(np.float32)  # score units -> ~mm
        # keep the confluent pieces only: crumbs would be "infected areas" nobody would count
        pieces, n = ndimage.label(d <= 0, np.ones((3, 3, 3), bool))
        sizes = np.bincount(pieces.ravel(), minlength=n + 1)
        keep = sizes >= max(4 * _MIN_LESION_VOXELS, 0.02 * sizes[1:].sum())
        keep[0] = False
        near_kept = ndimage.binary_dilation(keep[pieces], iterations=3)
        les = _Lesion("ground-glass opacity", "irregular", bool(rng.random() < 0.5), True, True,
                      float(rng.uniform(-520, -400)), 0.0, int(codes[0]))  # fmt: skip
        w = _weight(np.where(keep[pieces] | ~(d <= 0), d, 1e3), les.ill_defined) * sel * near_kept
        ct[box] = _blend(ct[box], w, les, _texture(rng, w.shape, les.heterogeneous))
        gen[box][(w >= 0.8 - 1e-6) & (gen[box] == 0)] = gen_id0 + i  # opacity 0.8 is the mask edge
        occupied[box] |= d <= 6.0
        made.append(les)
    return made


# ------------------------------------------------------------------------------------------ measuring


def density_class(mean_hu: float) -> str:
    """Density against the soft-tissue reference (:data:`SOFT_TISSUE_HU` +- :data:`DENSITY_MARGIN`)."""
    if mean_hu < SOFT_TISSUE_HU - DENSITY_MARGIN:
        return "hypodense"
    if mean_hu > SOFT_TISSUE_HU + DENSITY_MARGIN:
        return "hyperdense"
    return "isodense"


def measure_lesion(ct, lesion, lung, body, any_lesion, background: float) -> dict:
    """Measured HU statistics, edge ratio and contact of one lesion (boolean mask, cropped arrays)."""
    core = ndimage.binary_erosion(lesion)
    if core.sum() < 8:
        core = lesion
    values = ct[core]
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    plane = np.zeros((3, 3, 3), dtype=bool)
    plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    ring = ndimage.binary_dilation(lesion, plane) & ~lesion & lung & ~any_lesion
    contrast = q50 - background
    edge_ratio = float((np.median(ct[ring]) - background) / contrast) if ring.any() and abs(contrast) > 1 else 0.0
    grown = ndimage.binary_dilation(lesion, ndimage.generate_binary_structure(3, 3))
    return {
        "mean_hu": round(float(values.mean()), 1),
        "spread_hu": round(float((q75 - q25) / 1.349), 1),
        "edge_ratio": round(edge_ratio, 3),
        "touches_non_lung": bool((grown & body & ~lung).any()),
    }
