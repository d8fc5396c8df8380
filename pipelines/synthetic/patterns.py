"""Stain patterns of the synthetic dataset: the three landmark stains and one protein pattern per class.

Every function takes a `Scene` (a layout plus lazily computed shared fields) and a numpy Generator and returns
a float32 [S, S] signal with peaks near 1 (the caller scales, adds noise and quantises). The protein patterns
follow the atlas' own descriptions, placed relative to the landmarks: e.g. nucleoplasm fills the nucleus,
plasma membrane lines every cell edge, cell junctions only the edges shared by two cells, microtubules follow
the red stain, the endoplasmic reticulum the yellow one. Confusable cytoplasmic dot classes differ in size,
number, distribution and shape (hollow or not). `GREEN_PATTERNS[c]` draws class c (index order of
`schemas.CLASS_NAMES`).
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

import schemas
from pipelines.synthetic import cells as sc


class Scene:
    """A layout and the fields that several stains share, computed on first use."""

    def __init__(self, layout: sc.Layout, rng: np.random.Generator):
        self.layout = layout
        self.size = layout.size
        self._rng = rng  # landmark randomness (ER web, textures): fixed per sample, not per label

    @functools.cached_property
    def masks(self) -> dict[str, np.ndarray]:
        return self.layout.masks()

    @functools.cached_property
    def cell(self) -> np.ndarray:
        return self.layout.cell_id > 0

    @functools.cached_property
    def nucleus(self) -> np.ndarray:
        return self.cell & (self.layout.d_nuc < 1.0)

    @functools.cached_property
    def cytoplasm(self) -> np.ndarray:
        return self.cell & ~self.nucleus

    @functools.cached_property
    def soft_nucleus(self) -> np.ndarray:
        """Anti-aliased nucleus (interphase nuclei, plates, daughter nuclei)."""
        lay = self.layout
        return sc.soft_edge((1.0 - lay.d_nuc) * lay.nuc_radius_map, lay.px(2.0)) * self.cell

    @functools.cached_property
    def soft_cell(self) -> np.ndarray:
        lay = self.layout
        return sc.soft_edge((1.0 - lay.d_cell) * lay.cell_radius_map, lay.px(2.0)) * self.cell

    @functools.cached_property
    def soft_cytoplasm(self) -> np.ndarray:
        return self.soft_cell * (1.0 - self.soft_nucleus)

    @functools.cached_property
    def interphase(self) -> np.ndarray:
        return self.layout.kind_map == sc.INTERPHASE

    @functools.cached_property
    def not_mitotic(self) -> np.ndarray:
        return self.cell & (self.layout.kind_map != sc.MITOTIC)

    @functools.cached_property
    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Cell pixels on any cell edge, and on edges shared by two cells."""
        return sc._edges(self.layout.cell_id)

    @functools.cached_property
    def depth(self) -> np.ndarray:
        return self.layout.cyto_depth()

    @functools.cached_property
    def texture(self) -> np.ndarray:
        return sc.smooth_noise(self._rng, self.size, 14.0)

    @functools.cached_property
    def er(self) -> np.ndarray:
        """Perinuclear reticular ER, densest at the nuclear envelope, fading towards the cell rim."""
        lay = self.layout
        web = sc.reticular_network(self._rng, self.size, lay.px(7.0))
        falloff = np.exp(-self.depth / 0.4) * self.soft_cytoplasm * self.not_mitotic
        envelope = np.exp(-(((lay.d_nuc - 1.0) * lay.nuc_radius_map / max(lay.px(4.0), 0.7)) ** 2))
        return ((0.25 + 0.75 * web) * falloff + 0.5 * envelope * self.not_mitotic).astype(np.float32)

    @functools.cached_property
    def microtubules(self) -> np.ndarray:
        """Interphase microtubule arrays (weaker where they cross the nucleus)."""
        lay = self.layout
        pts = lay.mt_points[lay.mt_inside]
        if pts.shape[0] == 0:
            return np.zeros((self.size, self.size), dtype=np.float32)
        step = float(np.hypot(*(lay.mt_points[0, 1] - lay.mt_points[0, 0])))
        iy = np.clip(np.round(pts[:, 0]).astype(np.int64), 0, self.size - 1)
        ix = np.clip(np.round(pts[:, 1]).astype(np.int64), 0, self.size - 1)
        w = np.where(self.nucleus[iy, ix], 0.35, 1.0)
        img = sc.lines(pts, self.size, lay.sigma(1.0), step, w)
        return np.minimum(img, 2.0) / 1.4

    @functools.cached_property
    def spindle(self) -> np.ndarray:
        """Bipolar spindles of mitotic cells: fibres from each pole fanning to the chromosome plate."""
        lay = self.layout
        step = max(lay.px(1.5), 0.5)
        pts = []
        for pole_a, pole_b, center, plate_dir, half, _ in lay.spindles:
            for pole in (pole_a, pole_b):
                for t in np.linspace(-1, 1, 9):
                    pts.append(sc.segment_points(pole, center + plate_dir * half * 0.9 * t, step))
                for ang in np.linspace(0, 2 * np.pi, 8, endpoint=False):  # short astral rays
                    d = np.array([np.sin(ang), np.cos(ang)]) * lay.px(10.0)
                    pts.append(sc.segment_points(pole, pole + d, step))
        if not pts:
            return np.zeros((self.size, self.size), dtype=np.float32)
        img = sc.lines(np.concatenate(pts), self.size, lay.sigma(1.2), step)
        img += sc.dots(np.array([p for s in lay.spindles for p in s[:2]]), self.size, lay.sigma(3.0))
        return np.minimum(img, 2.0) / 1.5

    @functools.cached_property
    def bridge(self) -> np.ndarray:
        """Cytokinetic bridges between daughter cells, with a brighter midbody."""
        lay = self.layout
        if not lay.bridges:
            return np.zeros((self.size, self.size), dtype=np.float32)
        step = max(lay.px(1.0), 0.5)
        pts = np.concatenate([sc.segment_points(a, b, step) for a, b in lay.bridges])
        img = sc.lines(pts, self.size, lay.sigma(2.0), step)
        img += sc.dots(np.array([(a + b) / 2 for a, b in lay.bridges]), self.size, lay.sigma(3.0))
        return img


# ----------------------------------------------------------------------------------------------------
# Landmark stains


def blue(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Nuclei: textured fill, darker nucleoli; chromosome plates and daughter nuclei are brighter."""
    lay = scene.layout
    level = np.where(scene.interphase, 0.55, 0.95).astype(np.float32)
    tex = 0.75 + 0.5 * scene.texture
    rim = np.clip(lay.d_nuc - 0.8, 0, 0.2) * 1.5
    return (scene.soft_nucleus * level * (tex + rim) * (1.0 - 0.55 * lay.nucleoli)).astype(np.float32)


def red(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Microtubules: arrays radiating from the centrosome, spindles, bridges, faint diffuse tubulin."""
    return 0.6 * scene.microtubules + 0.9 * scene.spindle + 0.6 * scene.bridge + 0.12 * scene.soft_cytoplasm


def yellow(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Endoplasmic reticulum: perinuclear reticular web."""
    return scene.er


LANDMARKS: dict[str, Callable[[Scene, np.random.Generator], np.ndarray]] = {
    "red": red,
    "blue": blue,
    "yellow": yellow,
}
assert set(LANDMARKS) | {"green"} == set(schemas.STAINS)


# ----------------------------------------------------------------------------------------------------
# Protein patterns (green), one per class


def _edge_lines(edge: np.ndarray, sigma: float) -> np.ndarray:
    """A line of peak ~1 along a one-pixel edge mask."""
    return sc.blur(edge.astype(np.float32), sigma) * np.float32(np.sqrt(2 * np.pi) * sigma)


def _counts(rng, scene, lo, hi):
    return rng.integers(lo, hi + 1, len(scene.layout.cells))


def _nuclear_dots(scene, rng, lo, hi, sigma_ref, avoid_nucleoli=True, weight_range=(0.6, 1.0)):
    lay = scene.layout
    region = scene.nucleus & (lay.nucleoli < 0.3) if avoid_nucleoli else scene.nucleus
    region &= lay.d_nuc < 0.92
    kinds = [c.kind for c in lay.cells]
    counts = [0 if k == sc.MITOTIC else n for k, n in zip(kinds, _counts(rng, scene, lo, hi))]
    pts, _ = sc.sample_in_cells(lay, rng, region, counts)
    return sc.dots(pts, scene.size, lay.sigma(sigma_ref), rng.uniform(*weight_range, len(pts)))


def _cyto_dots(scene, rng, lo, hi, sigma_ref, perinuclear=0.0, weight_range=(0.6, 1.0)):
    lay = scene.layout
    weight = None
    if perinuclear > 0:
        weight = np.exp(-scene.depth * perinuclear).astype(np.float32)
    pts, _ = sc.sample_in_cells(
        lay, rng, scene.cytoplasm & (scene.depth < 0.95), _counts(rng, scene, lo, hi), weight
    )
    return sc.dots(pts, scene.size, lay.sigma(sigma_ref), rng.uniform(*weight_range, len(pts)))


def nucleoplasm(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Fills the nucleus, sparing the nucleoli."""
    tex = 0.8 + 0.4 * sc.smooth_noise(rng, scene.size, 20.0)
    signal = scene.soft_nucleus * scene.not_mitotic * tex * (1.0 - 0.8 * scene.layout.nucleoli)
    return signal.astype(np.float32)


def nuclear_membrane(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A thin bright rim along the nuclear edge."""
    lay = scene.layout
    dist = (lay.d_nuc - 1.0) * lay.nuc_radius_map
    width = max(lay.px(2.5), 0.6)
    return (np.exp(-((dist / width) ** 2)) * scene.not_mitotic).astype(np.float32)


def nucleoli(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """The nucleoli themselves: a few bright round spots inside the nucleus."""
    lay = scene.layout
    return (lay.nucleoli * scene.soft_nucleus).astype(np.float32)


def nucleoli_fibrillar_center(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Clusters of tiny dots inside each nucleolus (its fibrillar centres)."""
    lay = scene.layout
    pts = []
    for c in lay.cells:
        for y, x, r in c.nucleoli:
            n = int(rng.integers(3, 7))
            ang = rng.uniform(0, 2 * np.pi, n)
            rad = r * np.sqrt(rng.uniform(0.1, 0.8, n))
            pts.append(np.stack([y + rad * np.sin(ang), x + rad * np.cos(ang)], axis=1))
    if not pts:
        return np.zeros((scene.size, scene.size), dtype=np.float32)
    img = sc.dots(np.concatenate(pts), scene.size, lay.sigma(1.5), 1.2)
    return np.minimum(img, 1.5)


def nuclear_speckles(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Many irregular small dots over the nucleoplasm (not the nucleoli) on a faint diffuse haze."""
    haze = 0.15 * scene.soft_nucleus * (1 - scene.layout.nucleoli) * scene.not_mitotic
    return _nuclear_dots(scene, rng, 14, 28, 2.2) + haze


def nuclear_bodies(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A few (2-6) distinct round bright dots per nucleus, larger than speckles."""
    return _nuclear_dots(scene, rng, 2, 6, 2.8, weight_range=(0.85, 1.0))


def endoplasmic_reticulum(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Follows the yellow ER stain."""
    return scene.er


def golgi_apparatus(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A dense perinuclear cap on one side of the nucleus (the centrosome side), ribbon-textured."""
    lay = scene.layout
    out = np.zeros((scene.size, scene.size), dtype=np.float32)
    ribbon = 0.5 + 0.5 * sc.reticular_network(rng, scene.size, lay.px(5.0))
    for k, c in enumerate(lay.cells):
        if c.centrosome is None:
            continue
        y0, y1, x0, x1 = c.bbox
        own = (lay.cell_id[y0:y1, x0:x1] == k + 1) & ~scene.nucleus[y0:y1, x0:x1]
        toward = np.arctan2(c.centrosome[0] - c.nuc_center[0], c.centrosome[1] - c.nuc_center[1])
        yy, xx = np.ogrid[y0:y1, x0:x1]
        dy = (yy - c.nuc_center[0]).astype(np.float32)
        dx = (xx - c.nuc_center[1]).astype(np.float32)
        cos_dphi = (dy * np.sin(toward) + dx * np.cos(toward)) / (np.sqrt(dy * dy + dx * dx) + 1e-6)
        width = rng.uniform(0.6, 1.0)
        depth = scene.depth[y0:y1, x0:x1]
        cap = np.exp((cos_dphi - 1.0) / (0.5 * width * width)) * np.exp(-((depth / 0.33) ** 2))
        out[y0:y1, x0:x1] += (cap * own).astype(np.float32)
    return np.minimum(1.3 * out * ribbon, 1.2)


def peroxisomes(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Many tiny dots evenly spread over the cytoplasm."""
    return _cyto_dots(scene, rng, 40, 70, 1.5, weight_range=(0.6, 0.9))


def endosomes(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Medium-sized dots of varying brightness scattered through the cytoplasm, more towards the periphery."""
    lay = scene.layout
    weight = (0.3 + 0.7 * scene.depth).astype(np.float32)
    pts, _ = sc.sample_in_cells(
        lay, rng, scene.cytoplasm & (scene.depth < 0.95), _counts(rng, scene, 14, 28), weight
    )
    return sc.dots(pts, scene.size, lay.sigma(2.8), rng.uniform(0.4, 1.0, len(pts)))


def lysosomes(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Larger dots clustered around the nucleus."""
    return _cyto_dots(scene, rng, 8, 18, 4.0, perinuclear=4.0, weight_range=(0.7, 1.0))


def intermediate_filaments(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Long wavy filaments winding around the nucleus (a cage), spanning the cytoplasm."""
    lay = scene.layout
    starts, owner = sc.sample_in_cells(
        lay, rng, scene.cytoplasm & (scene.depth < 0.8), _counts(rng, scene, 8, 14)
    )
    if len(starts) == 0:
        return np.zeros((scene.size, scene.size), dtype=np.float32)
    n_steps = 40
    step = max(lay.px(3.0), 0.5)
    centers = np.array([lay.cells[k].nuc_center for k in owner])
    radial = np.arctan2(starts[:, 0] - centers[:, 0], starts[:, 1] - centers[:, 1])
    ang = radial + np.pi / 2 * rng.choice([-1, 1], len(starts)) + rng.normal(0, 0.3, len(starts))
    turn = np.cumsum(rng.normal(0, 0.08, (len(starts), n_steps)), axis=1)
    bend = (2 * np.pi / max(n_steps * 0.9, 1)) * rng.uniform(0.15, 0.35, len(starts))[:, None]
    bend *= rng.choice([-1, 1], len(starts))[:, None]
    a = ang[:, None] + turn + bend * np.arange(n_steps)[None]
    pts = starts[:, None, :] + np.cumsum(np.stack([np.sin(a), np.cos(a)], axis=-1) * step, axis=1)
    pts = pts.reshape(-1, 2)
    own = np.repeat(owner, n_steps)
    iy = np.clip(np.round(pts[:, 0]).astype(np.int64), 0, scene.size - 1)
    ix = np.clip(np.round(pts[:, 1]).astype(np.int64), 0, scene.size - 1)
    keep = lay.cell_id[iy, ix] == own + 1
    img = sc.lines(
        pts[keep], scene.size, lay.sigma(1.0), step, np.where(scene.nucleus[iy, ix], 0.4, 1.0)[keep]
    )
    return np.minimum(img, 2.0) / 1.3


def actin_filaments(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Straight parallel stress fibres crossing each cell at one orientation, plus a thin cortex."""
    lay = scene.layout
    pts, wts = [], []
    step = max(lay.px(2.0), 0.5)
    for c in lay.cells:
        if c.kind != sc.INTERPHASE:
            continue
        theta = rng.uniform(0, np.pi)
        d = np.array([np.sin(theta), np.cos(theta)])
        nrm = np.array([d[1], -d[0]])
        r = max(c.axes)
        n_fib = int(rng.integers(5, 10))
        offs = rng.uniform(-0.85 * r, 0.85 * r, n_fib)
        t = np.arange(-r, r, step)
        for o, w in zip(offs, rng.uniform(0.5, 1.0, n_fib)):
            p = c.center[None] + nrm[None] * o + d[None] * t[:, None]
            pts.append(p)
            wts.append(np.full(len(p), w))
    img = np.zeros((scene.size, scene.size), dtype=np.float32)
    if pts:
        p = np.concatenate(pts)
        w = np.concatenate(wts)
        iy = np.clip(np.round(p[:, 0]).astype(np.int64), 0, scene.size - 1)
        ix = np.clip(np.round(p[:, 1]).astype(np.int64), 0, scene.size - 1)
        inside = (p[:, 0] >= 0) & (p[:, 0] < scene.size) & (p[:, 1] >= 0) & (p[:, 1] < scene.size)
        inside &= (lay.cell_id[iy, ix] > 0) & (lay.d_cell[iy, ix] < 0.97)
        img = sc.lines(p[inside], scene.size, lay.sigma(1.0), step, w[inside])
    cortex = _edge_lines(scene.edges[0], lay.sigma(1.5))
    return np.minimum(img, 1.5) + 0.35 * cortex


def focal_adhesion_sites(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Short radial dashes near the cell periphery."""
    lay = scene.layout
    starts, owner = sc.sample_in_cells(
        lay, rng, scene.cytoplasm & (scene.depth > 0.75), _counts(rng, scene, 8, 18)
    )
    if len(starts) == 0:
        return np.zeros((scene.size, scene.size), dtype=np.float32)
    step = max(lay.px(1.5), 0.5)
    pts = []
    for p, k in zip(starts, owner):
        d = p - lay.cells[k].center
        d = d / (np.hypot(*d) + 1e-9)
        length = lay.px(rng.uniform(11.0, 18.0))
        pts.append(sc.segment_points(p - d * length / 2, p + d * length / 2, step))
    return np.minimum(sc.lines(np.concatenate(pts), scene.size, lay.sigma(1.3), step), 1.5)


def microtubules(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Follows the red microtubule stain in interphase cells."""
    return scene.microtubules


def microtubule_ends(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Comet-like dots at the growing (distal) ends of microtubules, near the cell periphery."""
    lay = scene.layout
    if lay.mt_points.shape[0] == 0:
        return np.zeros((scene.size, scene.size), dtype=np.float32)
    last = lay.mt_inside.sum(axis=1) - 1
    ok = last >= 3
    rows = np.flatnonzero(ok)
    tip = lay.mt_points[rows, last[ok]]
    back = lay.mt_points[rows, last[ok] - 2]
    pts = np.concatenate([tip, 0.5 * (tip + back)])
    w = np.concatenate([np.full(len(tip), 1.3), np.full(len(tip), 0.6)])
    return np.minimum(sc.dots(pts, scene.size, lay.sigma(1.8), w), 1.5)


def cytokinetic_bridge(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """The intercellular bridge and midbody between two daughter cells."""
    return np.minimum(1.3 * scene.bridge, 1.5)


def mitotic_spindle(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """The bipolar spindle of mitotic cells."""
    return scene.spindle


def _centrosome_points(scene):
    lay = scene.layout
    return [(k, c.centrosome) for k, c in enumerate(lay.cells) if c.centrosome is not None]


def microtubule_organizing_center(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """One larger dot beside the nucleus with a diffuse halo around it."""
    lay = scene.layout
    pts = np.array([p for _, p in _centrosome_points(scene)]).reshape(-1, 2)
    return sc.dots(pts, scene.size, lay.sigma(6.0), 1.0) + sc.dots(pts, scene.size, lay.sigma(14.0), 0.35)


def centrosome(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A pair of small sharp dots (the centrioles) beside the nucleus, sometimes a single one."""
    lay = scene.layout
    pts = []
    for _, p in _centrosome_points(scene):
        pts.append(p)
        if rng.random() < 0.9:
            ang = rng.uniform(0, 2 * np.pi)
            pts.append(p + lay.px(9.0) * np.array([np.sin(ang), np.cos(ang)]))
    return np.minimum(sc.dots(np.array(pts).reshape(-1, 2), scene.size, lay.sigma(2.8), 1.5), 1.5)


def lipid_droplets(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Hollow rings of various sizes in the cytoplasm."""
    lay = scene.layout
    centers, _ = sc.sample_in_cells(
        lay, rng, scene.cytoplasm & (scene.depth < 0.85), _counts(rng, scene, 3, 9)
    )
    radii = lay.px(1.0) * rng.uniform(6.0, 11.0, len(centers))
    step = max(lay.px(1.0), 0.4)
    return np.minimum(sc.lines(sc.circle_points(centers, radii, step), scene.size, lay.sigma(1.3), step), 1.5)


def plasma_membrane(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A thin line along every cell edge (free edges and edges against other cells)."""
    return np.minimum(_edge_lines(scene.edges[0], scene.layout.sigma(1.6)), 1.5)


def cell_junctions(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A bright line only where two cells touch."""
    return np.minimum(1.8 * _edge_lines(scene.edges[1], scene.layout.sigma(2.2)), 1.5)


def mitochondria(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Many short worms in the cytoplasm, denser around the nucleus."""
    lay = scene.layout
    weight = np.exp(-scene.depth * 1.5).astype(np.float32)
    starts, owner = sc.sample_in_cells(
        lay, rng, scene.cytoplasm & (scene.depth < 0.9), _counts(rng, scene, 25, 45), weight
    )
    if len(starts) == 0:
        return np.zeros((scene.size, scene.size), dtype=np.float32)
    n_steps = 6
    step = max(lay.px(2.0), 0.5)
    a = rng.uniform(0, 2 * np.pi, len(starts))[:, None] + np.cumsum(
        rng.normal(0, 0.5, (len(starts), n_steps)), axis=1
    )
    pts = starts[:, None, :] + np.cumsum(np.stack([np.sin(a), np.cos(a)], axis=-1) * step, axis=1)
    pts = pts.reshape(-1, 2)
    iy = np.clip(np.round(pts[:, 0]).astype(np.int64), 0, scene.size - 1)
    ix = np.clip(np.round(pts[:, 1]).astype(np.int64), 0, scene.size - 1)
    keep = (lay.cell_id[iy, ix] == np.repeat(owner, n_steps) + 1) & ~scene.nucleus[iy, ix]
    return np.minimum(sc.lines(pts[keep], scene.size, lay.sigma(1.2), step, 0.8), 1.5)


def aggresome(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """One large bright blob beside the nucleus, in most cells."""
    lay = scene.layout
    pts, radii = [], []
    chosen = [c.kind == sc.INTERPHASE and rng.random() < 0.95 for c in lay.cells]
    if not any(chosen):  # at least one aggresome per field (the first interphase cell is well inside it)
        chosen = [c.kind == sc.INTERPHASE for c in lay.cells]
    for c, keep in zip(lay.cells, chosen):
        if not keep:
            continue
        ang = rng.uniform(0, 2 * np.pi)
        r = (c.radius - c.nuc_radius) * rng.uniform(0.4, 0.5)
        gap = sc.nucleus_extent(c, ang) + r + lay.px(1.0)  # beside the nucleus, not merged with it
        pts.append(c.nuc_center + gap * np.array([np.sin(ang), np.cos(ang)]))
        radii.append(r)
    img = np.zeros((scene.size, scene.size), dtype=np.float32)
    for p, r in zip(pts, radii):
        y0, y1, x0, x1 = sc._bbox(p, r * 1.5, scene.size)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        dist = np.sqrt((yy - p[0]) ** 2 + (xx - p[1]) ** 2)
        img[y0:y1, x0:x1] += np.clip((r - dist) / max(r * 0.25, 0.5), 0, 1)
    return np.minimum(1.6 * img, 1.5) * scene.cell  # aggregates are bright


def cytosol(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Diffuse fill of the cytoplasm."""
    tex = 0.75 + 0.35 * sc.smooth_noise(rng, scene.size, 16.0)
    return (scene.soft_cytoplasm * tex * 0.85).astype(np.float32)


def cytoplasmic_bodies(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A few (1-3) solid round bodies per cell, anywhere in the cytoplasm."""
    lay = scene.layout
    centers, _ = sc.sample_in_cells(
        lay, rng, scene.cytoplasm & (scene.depth > 0.15) & (scene.depth < 0.85), _counts(rng, scene, 1, 3)
    )
    img = np.zeros((scene.size, scene.size), dtype=np.float32)
    for p in centers:
        r = lay.px(rng.uniform(6.5, 10.0)) + 0.5
        y0, y1, x0, x1 = sc._bbox(p, r * 1.5, scene.size)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        dist = np.sqrt((yy - p[0]) ** 2 + (xx - p[1]) ** 2)
        img[y0:y1, x0:x1] += np.clip((r - dist) / max(r * 0.3, 0.5) + 0.5, 0, 1)
    return np.minimum(img, 1.0) * scene.cell


def rods_and_rings(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Two to four sharp elongated rods or rings per cell in the cytoplasm."""
    lay = scene.layout
    centers, _ = sc.sample_in_cells(
        lay, rng, scene.cytoplasm & (scene.depth < 0.8), _counts(rng, scene, 2, 4)
    )
    step = max(lay.px(1.0), 0.4)
    pts = [np.zeros((0, 2))]
    for p in centers:
        if rng.random() < 0.6:
            ang = rng.uniform(0, np.pi)
            d = np.array([np.sin(ang), np.cos(ang)]) * lay.px(rng.uniform(11.0, 17.0))
            pts.append(sc.segment_points(p - d, p + d, step))
        else:
            pts.append(sc.circle_points(p[None], np.array([lay.px(rng.uniform(6.0, 8.0))]), step))
    img = np.minimum(1.3 * sc.lines(np.concatenate(pts), scene.size, lay.sigma(1.8), step), 1.5)
    return img * (1.0 - scene.soft_nucleus)  # cytoplasmic: a long rod stops at the nuclear envelope


GREEN_PATTERNS: tuple[Callable[[Scene, np.random.Generator], np.ndarray], ...] = (
    nucleoplasm,
    nuclear_membrane,
    nucleoli,
    nucleoli_fibrillar_center,
    nuclear_speckles,
    nuclear_bodies,
    endoplasmic_reticulum,
    golgi_apparatus,
    peroxisomes,
    endosomes,
    lysosomes,
    intermediate_filaments,
    actin_filaments,
    focal_adhesion_sites,
    microtubules,
    microtubule_ends,
    cytokinetic_bridge,
    mitotic_spindle,
    microtubule_organizing_center,
    centrosome,
    lipid_droplets,
    plasma_membrane,
    cell_junctions,
    mitochondria,
    aggresome,
    cytosol,
    cytoplasmic_bodies,
    rods_and_rings,
)
assert len(GREEN_PATTERNS) == schemas.NUM_CLASSES
