"""Cell fields for the synthetic dataset: layout of cells and their landmarks, and drawing primitives.

A `Layout` is one field of view: a few cells of random size, shape and position (some touching each other
or cut by the border), each with a nucleus, nucleoli, a centrosome beside the nucleus, microtubules radiating
from it, and optionally dividing cells (a mitotic cell with a chromosome plate and spindle, or two daughter
cells joined by a cytokinetic bridge). Per-pixel fields (owner cell, normalised distances to the cell and
nucleus rims) let the protein patterns of `pipelines.synthetic.patterns` be placed relative
to these landmarks. Sizes are given in reference pixels of a 512 px image and scale with the image size.

Everything here is pure numpy (plus scipy.ndimage for blurs); per-cell work happens in the cell's bounding
box, never over the whole image.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

try:
    from scipy import ndimage
except ImportError as e:  # an install without the extra, e.g. a Dataflow worker's
    raise ImportError(
        "the synthetic dataset generator needs scipy: install the project with its `synthetic` extra "
        "(pip install -e '.[synthetic]'; `make setup` does)"
    ) from e

REFERENCE_SIZE = 512  # sizes in reference pixels are for a 512 px image
TYPICAL_CELL_RADIUS = 0.135  # mean cell radius of an unmagnified field, as a fraction of the image side
MIN_SIGMA_PX = 0.75  # blurs never go below this, so small dots and lines stay visible at small image sizes

INTERPHASE, MITOTIC, DAUGHTER = 0, 1, 2


@dataclasses.dataclass
class Cell:
    """Geometry of one cell (pixel units of the rendered image; points are (y, x))."""

    center: np.ndarray
    axes: tuple[float, float]
    angle: float
    harmonics: np.ndarray  # (amp2, phase2, amp3, phase3) of the rim's radial modulation
    nuc_center: np.ndarray
    nuc_axes: tuple[float, float]
    nuc_angle: float
    kind: int = INTERPHASE
    partner: int = -1  # index of the other daughter cell
    centrosome: np.ndarray | None = None
    nucleoli: np.ndarray | None = None  # (k, 3): y, x, radius
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)  # y0, y1, x0, x1 (exclusive ends), clipped to the image

    @property
    def radius(self) -> float:
        """Mean radius of the cell."""
        return float(np.mean(self.axes))

    @property
    def nuc_radius(self) -> float:
        """Mean radius of the nucleus (or chromosome plate half-length for a mitotic cell)."""
        return float(np.mean(self.nuc_axes))


@dataclasses.dataclass
class Layout:
    """One field of view: cells plus per-pixel fields.

    Attributes:
      size: image side in pixels.
      cells: the cells; pixel fields refer to them as index + 1 (0 = background).
      cell_id: int32 [S, S], owner cell + 1 of each pixel, 0 in the background.
      d_cell: float32 [S, S], normalised distance from the owner cell's centre (1 on its rim, 2 outside).
      d_nuc: float32 [S, S], normalised distance from the owner's nucleus centre (1 on the nuclear rim).
      nucleoli: float32 [S, S] in [0, 1], soft nucleolus discs.
      mt_points: (n_lines, n_steps, 2) microtubule polylines from the centrosomes; mt_inside
        (n_lines, n_steps) tells which points are drawn (inside the line's own cell, before it first
        leaves it).
      mt_cell: (n_lines,) owner cell index of each microtubule.
      spindles: list of (pole_a, pole_b, plate_center, plate_dir, plate_half_length, cell index).
      bridges: list of (point_a, point_b) segments of cytokinetic bridges.
      zoom: magnification relative to a 512 px field (1 at 512 px; above 1 when a small image shows a
        zoomed-in part of a field so that its cells keep `min_cell_radius` pixels).
    """

    size: int
    cells: list[Cell]
    cell_id: np.ndarray
    d_cell: np.ndarray
    d_nuc: np.ndarray
    nucleoli: np.ndarray
    mt_points: np.ndarray
    mt_inside: np.ndarray
    mt_cell: np.ndarray
    spindles: list
    bridges: list
    zoom: float = 1.0

    @property
    def scale(self) -> float:
        """Pixels per reference pixel (the image's share of a 512 px field, times the zoom)."""
        return self.size / REFERENCE_SIZE * self.zoom

    def px(self, ref: float) -> float:
        """Reference pixels -> pixels of this image."""
        return ref * self.scale

    def sigma(self, ref: float) -> float:
        """Blur sigma in pixels for a reference sigma, never below MIN_SIGMA_PX."""
        return max(ref * self.scale, MIN_SIGMA_PX)

    @functools.cached_property
    def nuc_radius_map(self) -> np.ndarray:
        """Per-pixel mean nucleus radius of the owner cell (pixels)."""
        return self.per_cell([c.nuc_radius for c in self.cells])

    @functools.cached_property
    def cell_radius_map(self) -> np.ndarray:
        """Per-pixel mean radius of the owner cell (pixels; 1 in the background)."""
        return np.maximum(self.per_cell([c.radius for c in self.cells]), 1.0)

    @functools.cached_property
    def kind_map(self) -> np.ndarray:
        """Per-pixel kind of the owner cell (INTERPHASE, MITOTIC, DAUGHTER; -1 in the background)."""
        table = np.array([-1] + [c.kind for c in self.cells], dtype=np.int8)
        return table[self.cell_id]

    def per_cell(self, values) -> np.ndarray:
        """Per-pixel map of a per-cell value (0 in the background)."""
        table = np.concatenate([[0.0], np.asarray(values, dtype=np.float32)]).astype(np.float32)
        return table[self.cell_id]

    def masks(self) -> dict[str, np.ndarray]:
        """Boolean region masks [S, S] used to place and check patterns.

        Keys: `cell`, `nucleus`, `cytoplasm`, `nucleoli`, `nuclear_rim` (a band around the nuclear edge),
        `cell_rim` (a band along every cell edge), `junction` (a band along edges between two cells),
        `perinuclear` (cytoplasm near the nucleus), `peripheral` (cytoplasm near the cell rim), `mitotic`
        (pixels of mitotic cells), `daughter` (pixels of daughter cells), `centrosome` (around the
        centrosomes), `interphase_cytoplasm` (cytoplasm of interphase cells).
        """
        cell = self.cell_id > 0
        nucleus = cell & (self.d_nuc < 1.0)
        kinds = self.kind_map
        nuc_r = self.nuc_radius_map
        cell_r = self.cell_radius_map
        rim_px = self.px(6.0) + 1.0
        edge_any, edge_contact = _edges(self.cell_id)
        band = max(1, int(round(self.px(4.0))))
        cell_rim = cell & (
            ndimage.binary_dilation(edge_any, iterations=band) | (self.d_cell > 1.0 - rim_px / cell_r)
        )
        junction = cell & ndimage.binary_dilation(edge_contact, iterations=band)
        cytoplasm = cell & ~nucleus
        depth = self.cyto_depth()
        centrosome = np.zeros_like(cell)
        for k, c in enumerate(self.cells):
            if c.centrosome is None:
                continue
            y, x = c.centrosome
            r = self.px(14.0) + 1.0
            y0, y1, x0, x1 = _bbox(c.centrosome, r, self.size)
            yy, xx = np.mgrid[y0:y1, x0:x1]
            centrosome[y0:y1, x0:x1] |= ((yy - y) ** 2 + (xx - x) ** 2 <= r * r) & (
                self.cell_id[y0:y1, x0:x1] == k + 1
            )
        return {
            "cell": cell,
            "nucleus": nucleus,
            "cytoplasm": cytoplasm,
            "nucleoli": nucleus & (self.nucleoli > 0.5),
            "nuclear_rim": cell & (np.abs(self.d_nuc - 1.0) * nuc_r <= rim_px),
            "cell_rim": cell_rim,
            "junction": junction,
            "perinuclear": cytoplasm & (depth < 0.4),
            "peripheral": cytoplasm & (depth > 0.6),
            "mitotic": kinds == MITOTIC,
            "daughter": kinds == DAUGHTER,
            "centrosome": centrosome,
            "interphase_cytoplasm": cytoplasm & (kinds == INTERPHASE),
        }

    def cyto_depth(self) -> np.ndarray:
        """Per-pixel position across the cytoplasm: 0 at the nuclear rim, 1 at the cell rim (clipped)."""
        nuc_r = self.nuc_radius_map
        cell_r = self.cell_radius_map
        out_nuc = np.maximum(self.d_nuc - 1.0, 0.0) * nuc_r
        to_rim = np.maximum(1.0 - self.d_cell, 0.0) * cell_r
        return np.clip(out_nuc / (out_nuc + to_rim + 1e-3), 0.0, 1.0).astype(np.float32)


def _bbox(center, radius: float, size: int) -> tuple[int, int, int, int]:
    y, x = center
    r = radius + 2
    y0 = min(max(int(np.floor(y - r)), 0), size)
    x0 = min(max(int(np.floor(x - r)), 0), size)
    y1 = max(min(int(np.ceil(y + r)) + 1, size), y0)
    x1 = max(min(int(np.ceil(x + r)) + 1, size), x0)
    return y0, y1, x0, x1


def _edges(cell_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cell pixels on any cell edge, and on edges shared with another cell (the image border is no edge)."""
    padded = np.pad(cell_id, 1, mode="edge")
    edge_any = np.zeros(cell_id.shape, dtype=bool)
    edge_contact = np.zeros(cell_id.shape, dtype=bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        nb = padded[dy : dy + cell_id.shape[0], dx : dx + cell_id.shape[1]]
        diff = nb != cell_id
        edge_any |= diff
        edge_contact |= diff & (nb > 0)
    inside = cell_id > 0
    return edge_any & inside, edge_contact & inside


def _ellipse_distance(yy, xx, center, axes, angle, harmonics=None) -> np.ndarray:
    """Normalised elliptical distance (1 on the rim) of a pixel grid (broadcastable yy, xx) from a shape.

    `harmonics` (amp2, phase2, amp3, phase3) modulate the rim radially:
    1 + a2 cos(2 phi + p2) + a3 cos(3 phi + p3).
    """
    dy = (yy - np.float32(center[0])).astype(np.float32)
    dx = (xx - np.float32(center[1])).astype(np.float32)
    ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = (dx * ca + dy * sa) * np.float32(1.0 / axes[0])
    v = (dy * ca - dx * sa) * np.float32(1.0 / axes[1])
    rho = np.sqrt(u * u + v * v)
    if harmonics is not None:
        a2, p2, a3, p3 = (float(h) for h in harmonics)
        r = np.sqrt(dx * dx + dy * dy) + np.float32(1e-6)
        c1, s1 = dx / r, dy / r
        c2, s2 = c1 * c1 - s1 * s1, 2 * c1 * s1
        c3, s3 = c2 * c1 - s2 * s1, s2 * c1 + c2 * s1
        mod = 1.0 + a2 * (c2 * np.cos(p2) - s2 * np.sin(p2)) + a3 * (c3 * np.cos(p3) - s3 * np.sin(p3))
        rho = rho / mod.astype(np.float32)
    return rho.astype(np.float32)


def nucleus_extent(cell: Cell, angle: float) -> float:
    """Distance from the nucleus centre to its rim in the direction `angle` (radians; y = sin, x = cos)."""
    phi = angle - cell.nuc_angle
    a, b = cell.nuc_axes
    return float(1.0 / np.sqrt((np.cos(phi) / a) ** 2 + (np.sin(phi) / b) ** 2))


def _interphase_cell(rng: np.random.Generator, center, radius: float) -> Cell:
    aspect = rng.uniform(0.65, 1.0)
    a = radius / np.sqrt(aspect)
    axes = (a, a * aspect)
    angle = rng.uniform(0, np.pi)
    harmonics = np.array(
        [rng.uniform(0, 0.1), rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.07), rng.uniform(0, 2 * np.pi)]
    )
    nuc_r = radius * rng.uniform(0.42, 0.55)
    nuc_aspect = rng.uniform(0.7, 1.0)
    na = nuc_r / np.sqrt(nuc_aspect)
    offset = rng.normal(0, 0.08 * radius, 2)
    return Cell(
        center=np.asarray(center, dtype=np.float64),
        axes=axes,
        angle=angle,
        harmonics=harmonics,
        nuc_center=np.asarray(center, dtype=np.float64) + offset,
        nuc_axes=(na, na * nuc_aspect),
        nuc_angle=angle + rng.normal(0, 0.3),
    )


def _mitotic_cell(rng: np.random.Generator, center, radius: float) -> Cell:
    r = radius * 0.8
    plate_half = r * rng.uniform(0.5, 0.6)
    angle = rng.uniform(0, np.pi)
    return Cell(
        center=np.asarray(center, dtype=np.float64),
        axes=(r, r * rng.uniform(0.9, 1.0)),
        angle=angle,
        harmonics=np.zeros(4),
        nuc_center=np.asarray(center, dtype=np.float64),
        nuc_axes=(plate_half, plate_half * 0.22),
        nuc_angle=angle,
        kind=MITOTIC,
    )


def _daughter_pair(rng: np.random.Generator, center, radius: float, first_index: int) -> list[Cell]:
    r = radius * 0.62
    angle = rng.uniform(0, 2 * np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)])
    cells = []
    for k, sign in enumerate((-1.0, 1.0)):
        c = np.asarray(center, dtype=np.float64) + sign * direction * r * 0.92
        nuc_r = r * rng.uniform(0.4, 0.48)
        cells.append(
            Cell(
                center=c,
                axes=(r, r * rng.uniform(0.85, 1.0)),
                angle=angle,
                harmonics=np.zeros(4),
                nuc_center=c - sign * direction * r * 0.12,
                nuc_axes=(nuc_r, nuc_r * rng.uniform(0.8, 1.0)),
                nuc_angle=angle,
                kind=DAUGHTER,
                partner=first_index + 1 - k,
            )
        )
    return cells


def make_layout(
    rng: np.random.Generator,
    size: int,
    force_mitotic: bool = False,
    force_daughters: bool = False,
    force_contact: bool = False,
    division_rate: float = 0.25,
    min_cell_radius: float = 0.0,
) -> Layout:
    """Draws a field of cells.

    Args:
      rng: source of randomness (the layout consumes it in a fixed way for given arguments).
      size: image side in pixels.
      force_mitotic: include at least one mitotic cell (for the mitotic spindle class).
      force_daughters: include at least one pair of daughter cells (for the cytokinetic bridge class).
      force_contact: make sure at least two cells touch (for the cell junctions class).
      division_rate: probability of each kind of dividing cell appearing when not forced.
      min_cell_radius: typical cell radius in pixels below which the field is magnified instead (a small
        image then shows fewer, larger cells, as a higher-power objective would: the zoom is
        min_cell_radius / typical radius, the number of cells falls with the zoom squared, never below 2).

    Returns:
      The layout with its per-pixel fields filled in.
    """
    s = float(size)
    zoom = max(1.0, min_cell_radius / (s * TYPICAL_CELL_RADIUS))
    base_radius = s * rng.uniform(0.11, 0.16) * zoom
    n_target = int(rng.integers(4, 11))
    if zoom > 1.0:
        n_target = max(2, int(np.floor(n_target / zoom**2 + rng.random())))
    cells: list[Cell] = []
    centers: list[np.ndarray] = []
    radii: list[float] = []

    out = 0.1 * s / zoom  # how far outside the image a cell's centre may lie

    def fits(c, r, slack=0.82):
        return all(np.hypot(*(c - c2)) >= slack * (r + r2) for c2, r2 in zip(centers, radii))

    def place(r, near_existing: bool, margin: float):
        for _ in range(60):
            if near_existing and centers:
                j = int(rng.integers(len(centers)))
                ang = rng.uniform(0, 2 * np.pi)
                dist = (r + radii[j]) * rng.uniform(0.82, 0.95)
                c = centers[j] + dist * np.array([np.sin(ang), np.cos(ang)])
                if not (-out <= c[0] <= s + out and -out <= c[1] <= s + out):
                    continue
            else:
                margin = min(margin, 0.5 * s)  # a big cell in a small (zoomed) field may not fit whole
                c = rng.uniform(margin, s - margin, 2)
            if fits(c, r):
                return c
        return None

    # Division is a per-cell event: a magnified field holds fewer cells, so shows dividing cells less often.
    rate = division_rate / zoom**2
    want_mitotic = force_mitotic or rng.random() < rate
    want_daughters = force_daughters or rng.random() < rate
    if want_daughters:
        r = base_radius * rng.uniform(0.95, 1.1)
        c = place(r * 1.2, near_existing=False, margin=1.1 * r)
        if c is None:
            c = np.array([s / 2, s / 2])
        pair = _daughter_pair(rng, c, r, len(cells))
        for cell in pair:
            cells.append(cell)
            centers.append(cell.center)
            radii.append(cell.radius)
    if want_mitotic:
        r = base_radius * rng.uniform(0.9, 1.05)
        c = place(r, near_existing=False, margin=0.85 * r)
        if c is None:
            c = np.array([s * 0.25, s * 0.25])
        cell = _mitotic_cell(rng, c, r)
        cells.append(cell)
        centers.append(cell.center)
        radii.append(cell.radius)
    n_interphase = max(n_target - len(cells), 2 if force_contact else 1)
    for k in range(n_interphase):
        r = base_radius * rng.uniform(0.8, 1.25)
        must_touch = force_contact and k == 1
        # the first interphase cell is well inside the image: every field shows interphase landmarks
        margin = 0.5 * r if k == 0 else -0.5 * out
        c = place(r, near_existing=must_touch or (k > 0 and rng.random() < 0.85), margin=margin)
        if c is None and k == 0:
            c = rng.uniform(0.3 * s, 0.7 * s, 2)  # crowded field: overlap; the rasteriser splits the pixels
        if c is None and must_touch and cells:
            to_middle = np.array([s / 2, s / 2]) - cells[-1].center  # a neighbour on the image's side
            c = cells[-1].center + to_middle / (np.hypot(*to_middle) + 1e-9) * (cells[-1].radius + r)
        if c is None:
            continue
        cell = _interphase_cell(rng, c, r)
        if must_touch:
            # put it against the previous interphase cell so the two share an edge
            prev = cells[-1]
            d = c - prev.center
            d = d / (np.hypot(*d) + 1e-9)
            cell.center = prev.center + d * (prev.radius + r) * 0.8
            cell.nuc_center = cell.center + (cell.nuc_center - c)
        cells.append(cell)
        centers.append(cell.center)
        radii.append(cell.radius)
    return _rasterise(rng, size, cells, zoom)


def _rasterise(rng: np.random.Generator, size: int, cells: list[Cell], zoom: float = 1.0) -> Layout:
    cell_id = np.zeros((size, size), dtype=np.int32)
    d_cell = np.full((size, size), 2.0, dtype=np.float32)
    for k, c in enumerate(cells):
        c.bbox = _bbox(c.center, max(c.axes) * 1.2, size)
        y0, y1, x0, x1 = c.bbox
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        d = _ellipse_distance(yy, xx, c.center, c.axes, c.angle, c.harmonics)
        sub = d_cell[y0:y1, x0:x1]
        take = (d < 1.0) & (d < sub)
        sub[take] = d[take]
        cell_id[y0:y1, x0:x1][take] = k + 1

    d_nuc = np.full((size, size), 99.0, dtype=np.float32)
    nucleoli = np.zeros((size, size), dtype=np.float32)
    for k, c in enumerate(cells):
        y0, y1, x0, x1 = c.bbox
        if y1 <= y0 or x1 <= x0:
            continue
        own = cell_id[y0:y1, x0:x1] == k + 1
        yy, xx = np.ogrid[y0:y1, x0:x1]
        d = _ellipse_distance(yy, xx, c.nuc_center, c.nuc_axes, c.nuc_angle)
        d_nuc[y0:y1, x0:x1][own] = d[own]
        if c.kind != MITOTIC:
            # nucleoli: a few discs well inside the nucleus
            n = int(rng.integers(1, 5))
            ang = rng.uniform(0, 2 * np.pi, n)
            rad = np.sqrt(rng.uniform(0, 1, n)) * 0.5 * c.nuc_radius
            radius = c.nuc_radius * rng.uniform(0.14, 0.22, n)
            ny = c.nuc_center[0] + rad * np.sin(ang)
            nx = c.nuc_center[1] + rad * np.cos(ang)
            c.nucleoli = np.stack([ny, nx, radius], axis=1)
            soft = np.zeros_like(d)
            for y, x, r in c.nucleoli:
                dist = np.sqrt((yy - y) ** 2 + (xx - x) ** 2)
                soft = np.maximum(soft, np.clip((r - dist) / max(r * 0.3, 0.5) + 0.5, 0.0, 1.0))
            nucleoli[y0:y1, x0:x1][own] = (soft * (d < 1.0))[own]
            # centrosome beside the nucleus, a short gap outside its rim (so it does not merge with a bright
            # nucleus at small image sizes)
            ang = rng.uniform(0, 2 * np.pi)
            direction = np.array([np.sin(ang), np.cos(ang)])
            c.centrosome = c.nuc_center + direction * (
                nucleus_extent(c, ang) + 0.2 * (c.radius - c.nuc_radius) + 1.0
            )
        else:
            c.nucleoli = np.zeros((0, 3))
    mt_points, mt_inside, mt_cell = _microtubules(rng, cells, cell_id, size, size / REFERENCE_SIZE * zoom)
    spindles, bridges = _division_geometry(cells)
    return Layout(
        size=size,
        cells=cells,
        cell_id=cell_id,
        d_cell=d_cell,
        d_nuc=d_nuc,
        nucleoli=nucleoli,
        mt_points=mt_points,
        mt_inside=mt_inside,
        mt_cell=mt_cell,
        spindles=spindles,
        bridges=bridges,
        zoom=zoom,
    )


def _microtubules(rng: np.random.Generator, cells: list[Cell], cell_id: np.ndarray, size: int, scale: float):
    """Polylines from each interphase centrosome, gently curved, cut where they first leave the cell."""
    max_r = max([c.radius for c in cells if c.centrosome is not None], default=1.0)
    n_steps = max(16, int(np.ceil(1.6 * max_r / max(scale * 1.5, 0.5))))
    starts, dirs, lengths, curls, owner = [], [], [], [], []
    for k, c in enumerate(cells):
        if c.centrosome is None:
            continue
        n = int(rng.integers(18, 30))
        ang = rng.uniform(0, 2 * np.pi, n)
        starts.append(np.repeat(c.centrosome[None], n, axis=0))
        dirs.append(ang)
        lengths.append(np.full(n, 1.6 * c.radius))
        curls.append(rng.normal(0, 0.6, n) / c.radius)
        owner.append(np.full(n, k))
    if not starts:
        return np.zeros((0, n_steps, 2)), np.zeros((0, n_steps), dtype=bool), np.zeros(0, dtype=np.int64)
    start = np.concatenate(starts)
    ang0 = np.concatenate(dirs)
    length = np.concatenate(lengths)
    curl = np.concatenate(curls)
    owner_a = np.concatenate(owner)
    t = np.linspace(0, 1, n_steps)[None, :] * length[:, None]  # arc length
    ang = ang0[:, None] + curl[:, None] * t
    step = length[:, None] / (n_steps - 1)
    dy = np.cumsum(np.sin(ang) * step, axis=1) - np.sin(ang[:, :1]) * step
    dx = np.cumsum(np.cos(ang) * step, axis=1) - np.cos(ang[:, :1]) * step
    pts = np.stack([start[:, None, 0] + dy, start[:, None, 1] + dx], axis=-1)
    iy = np.clip(np.round(pts[..., 0]).astype(np.int64), 0, size - 1)
    ix = np.clip(np.round(pts[..., 1]).astype(np.int64), 0, size - 1)
    in_img = (pts[..., 0] >= 0) & (pts[..., 0] <= size - 1) & (pts[..., 1] >= 0) & (pts[..., 1] <= size - 1)
    inside = (cell_id[iy, ix] == owner_a[:, None] + 1) & in_img
    inside = np.cumprod(inside, axis=1).astype(bool)
    return pts, inside, owner_a


def _division_geometry(cells: list[Cell]):
    spindles, bridges = [], []
    for k, c in enumerate(cells):
        if c.kind == MITOTIC:
            plate_dir = np.array([np.sin(c.angle), np.cos(c.angle)])
            normal = np.array([plate_dir[1], -plate_dir[0]])
            pole_dist = c.radius * 0.62
            spindles.append(
                (
                    c.center + normal * pole_dist,
                    c.center - normal * pole_dist,
                    c.center,
                    plate_dir,
                    c.nuc_axes[0],
                    k,
                )
            )
        elif c.kind == DAUGHTER and c.partner > k:
            other = cells[c.partner]
            mid = (c.center + other.center) / 2
            d = other.center - c.center
            d = d / (np.hypot(*d) + 1e-9)
            half = 0.35 * c.radius
            bridges.append((mid - d * half, mid + d * half))
    return spindles, bridges


# ----------------------------------------------------------------------------------------------------
# Drawing primitives


def stamps(points: np.ndarray, size: int, sigma: float, weights: np.ndarray | float = 1.0) -> np.ndarray:
    """Gaussian spots of peak `weights` at (y, x) points, drawn in small windows (no full-image blur)."""
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    if pts.shape[0] == 0:
        return np.zeros((size, size), dtype=np.float32)
    w = np.broadcast_to(np.asarray(weights, dtype=np.float32), (pts.shape[0],))
    r = max(int(np.ceil(2.5 * sigma)), 1)
    offs = np.arange(-r, r + 1, dtype=np.float32)
    cy = np.floor(pts[:, 0] + 0.5)
    cx = np.floor(pts[:, 1] + 0.5)
    inv = np.float32(-0.5 / (sigma * sigma))
    gy = np.exp(inv * (offs[None, :] - (pts[:, 0] - cy)[:, None]) ** 2) * w[:, None]
    gx = np.exp(inv * (offs[None, :] - (pts[:, 1] - cx)[:, None]) ** 2)
    vals = gy[:, :, None] * gx[:, None, :]
    yy = (cy[:, None] + offs[None, :]).astype(np.int64)
    xx = (cx[:, None] + offs[None, :]).astype(np.int64)
    ok = ((yy >= 0) & (yy < size))[:, :, None] & ((xx >= 0) & (xx < size))[:, None, :]
    flat = yy[:, :, None] * size + xx[:, None, :]
    img = np.bincount(flat[ok], weights=vals[ok], minlength=size * size)
    return img.reshape(size, size).astype(np.float32)


def splat(points: np.ndarray, size: int, weights: np.ndarray | float = 1.0) -> np.ndarray:
    """Adds weighted impulses at (y, x) points (bilinear) into a float32 [size, size] image."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if pts.shape[0] == 0:
        return np.zeros((size, size), dtype=np.float32)
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64), (pts.shape[0],))
    y0 = np.floor(pts[:, 0])
    x0 = np.floor(pts[:, 1])
    fy = pts[:, 0] - y0
    fx = pts[:, 1] - x0
    idx, wts = [], []
    for oy, ox, ww in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        yy = y0 + oy
        xx = x0 + ox
        ok = (yy >= 0) & (yy < size) & (xx >= 0) & (xx < size)
        idx.append((yy[ok] * size + xx[ok]).astype(np.int64))
        wts.append((w * ww)[ok])
    flat = np.bincount(np.concatenate(idx), weights=np.concatenate(wts), minlength=size * size)
    return flat.reshape(size, size).astype(np.float32)


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (truncated at 2.5 sigma) in float32."""
    return ndimage.gaussian_filter(image, sigma, truncate=2.5, output=np.float32, mode="constant")


def dots(points: np.ndarray, size: int, sigma: float, weights: np.ndarray | float = 1.0) -> np.ndarray:
    """Gaussian dots of peak ~weight at points."""
    return stamps(points, size, sigma, weights)


def lines(
    points: np.ndarray, size: int, sigma: float, step: float, weights: np.ndarray | float = 1.0
) -> np.ndarray:
    """Lines of peak ~weight through points sampled every `step` pixels (splatted, then one blur)."""
    img = splat(points, size, np.asarray(weights, dtype=np.float64) * step)
    return blur(img, sigma) * np.float32(np.sqrt(2 * np.pi) * sigma)


def soft_edge(distance_px: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased inside indicator from a signed distance to an edge in pixels (positive inside)."""
    return np.clip(distance_px / np.float32(max(width, 0.5)) + np.float32(0.5), 0.0, 1.0)


def _lerp_indices(n_out: int, n_in: int):
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    return lo, np.minimum(lo + 1, n_in - 1), (pos - lo).astype(np.float32)


def upsample(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a small square float image to [size, size] (gathers, no BLAS threads)."""
    lo, hi, f = _lerp_indices(size, image.shape[0])
    img = image.astype(np.float32)
    rows = img[lo] * (1 - f)[:, None] + img[hi] * f[:, None]
    lo, hi, f = _lerp_indices(size, image.shape[1])
    return rows[:, lo] * (1 - f)[None, :] + rows[:, hi] * f[None, :]


def smooth_noise(rng: np.random.Generator, size: int, cells_across: float = 8.0) -> np.ndarray:
    """Smooth random field in [0, 1] with features about size/cells_across pixels wide."""
    n = max(int(round(cells_across)) + 2, 3)
    return np.clip(upsample(rng.random((n, n), dtype=np.float32), size), 0, 1)


def segment_points(a: np.ndarray, b: np.ndarray, step: float) -> np.ndarray:
    """Points every `step` pixels on the segment a-b."""
    n = max(int(np.ceil(np.hypot(*(b - a)) / step)) + 1, 2)
    t = np.linspace(0, 1, n)[:, None]
    return a[None] * (1 - t) + b[None] * t


def circle_points(centers: np.ndarray, radii: np.ndarray, step: float) -> np.ndarray:
    """Points every ~`step` pixels on circles (centers (n, 2), radii (n,))."""
    out = []
    for (y, x), r in zip(np.asarray(centers).reshape(-1, 2), np.asarray(radii).reshape(-1)):
        n = max(int(np.ceil(2 * np.pi * r / step)), 6)
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        out.append(np.stack([y + r * np.sin(t), x + r * np.cos(t)], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2))


def sample_in_cells(
    layout: Layout,
    rng: np.random.Generator,
    region: np.ndarray,
    counts,
    weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Random points inside each cell's part of a region.

    Args:
      layout: the field.
      rng: randomness.
      region: boolean [S, S] mask the points must fall in (intersected with each cell).
      counts: number of points wanted per cell (sequence aligned with layout.cells).
      weight: optional [S, S] acceptance probability in [0, 1] (e.g. to favour the perinuclear region).

    Returns:
      points (n, 2) and their cell index (n,); a cell yields fewer points when its region is tiny.
    """
    pts_all, owner = [], []
    for k, (c, n) in enumerate(zip(layout.cells, counts)):
        n = int(n)
        y0, y1, x0, x1 = c.bbox
        if n <= 0 or y1 <= y0 or x1 <= x0:
            continue
        m = n * 6 + 8
        py = rng.uniform(y0, y1 - 1e-6, m)
        px = rng.uniform(x0, x1 - 1e-6, m)
        iy = py.astype(np.int64)
        ix = px.astype(np.int64)
        ok = region[iy, ix] & (layout.cell_id[iy, ix] == k + 1)
        if weight is not None:
            ok &= rng.random(m) < weight[iy, ix]
        sel = np.flatnonzero(ok)[:n]
        pts_all.append(np.stack([py[sel], px[sel]], axis=1))
        owner.append(np.full(sel.size, k))
    if not pts_all:
        return np.zeros((0, 2)), np.zeros(0, dtype=np.int64)
    return np.concatenate(pts_all), np.concatenate(owner)


def reticular_network(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """A fine reticular web in [0, 1]: the zero-crossing ridges of band-pass noise (`scale` pixels apart)."""
    low = max((size + 1) // 2, 8)
    noise = rng.standard_normal((low, low), dtype=np.float32)
    s = max(scale / 2.0, 0.6)
    band = ndimage.gaussian_filter(noise, s, truncate=2.5) - ndimage.gaussian_filter(
        noise, 2 * s, truncate=2.5
    )
    band /= np.std(band) + 1e-6
    web = np.exp(-((band / 0.35) ** 2)).astype(np.float32)
    web = np.repeat(np.repeat(web, 2, axis=0), 2, axis=1)[:size, :size]
    return np.pad(web, ((0, size - web.shape[0]), (0, size - web.shape[1])), mode="edge")
