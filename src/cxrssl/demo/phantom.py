"""Anatomy-like chest X-ray phantoms and visible lesions, shared by the NIH-like and VinDr-like data.

Images are float32 arrays in *display* convention (0 = black air, 1 = white bone) drawn in
normalised coordinates (``u`` = x / width, ``v`` = y / height), so the same anatomy renders at any
size and aspect ratio. The patient faces the viewer: the patient's right lung is on the image left.

Every lesion painter draws a consistent, distinctive appearance at an anatomically plausible place
and returns its bounding box in pixels ``(x_min, y_min, x_max, y_max)``, so the boxes written to
the annotation files are where the content is. That is what lets a small detector and a linear
probe learn something on ~100 CPU-sized images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Anatomy:
    """Per-patient geometry in normalised coordinates (small random variation around an adult PA)."""

    cx: float = 0.5            # body midline
    cy: float = 0.55           # body centre (vertical)
    body_rx: float = 0.44
    body_ry: float = 0.52
    lung_dx: float = 0.185     # lung centre distance from the midline
    lung_cy: float = 0.44
    lung_rx: float = 0.135
    lung_ry: float = 0.25
    heart_cx: float = 0.535    # heart sits left of the patient's midline (image right)
    heart_cy: float = 0.63
    heart_rx: float = 0.14
    heart_ry: float = 0.11
    lung_level: float = 0.16   # lung brightness (air-filled: dark)
    tissue_level: float = 0.46
    rib_phase: float = 0.0
    noise_seed: int = 0

    @staticmethod
    def sample(rng: np.random.Generator) -> Anatomy:
        s = rng.uniform(0.94, 1.06)
        return Anatomy(
            cx=0.5 + rng.uniform(-0.02, 0.02),
            cy=0.55 + rng.uniform(-0.02, 0.02),
            body_rx=0.44 * rng.uniform(0.95, 1.05),
            body_ry=0.52 * rng.uniform(0.97, 1.03),
            lung_dx=0.185 * s,
            lung_cy=0.44 + rng.uniform(-0.02, 0.02),
            lung_rx=0.135 * s,
            lung_ry=0.25 * rng.uniform(0.94, 1.06),
            heart_cx=0.535 + rng.uniform(-0.01, 0.01),
            heart_cy=0.63 + rng.uniform(-0.015, 0.015),
            heart_rx=0.14 * rng.uniform(0.93, 1.05),
            heart_ry=0.11 * rng.uniform(0.93, 1.07),
            lung_level=rng.uniform(0.12, 0.2),
            tissue_level=rng.uniform(0.42, 0.5),
            rib_phase=rng.uniform(-0.01, 0.01),
            noise_seed=int(rng.integers(2**31)),
        )

    def lung_center(self, side: int) -> tuple[float, float]:
        """Centre of the image-left (side 0) or image-right (side 1) lung."""
        return (self.cx - self.lung_dx if side == 0 else self.cx + self.lung_dx * 0.97, self.lung_cy)

    def jittered(self, rng: np.random.Generator) -> Anatomy:
        """The same patient on another day: positioning and exposure differ slightly."""
        return replace(
            self,
            cx=self.cx + rng.uniform(-0.01, 0.01),
            cy=self.cy + rng.uniform(-0.01, 0.01),
            lung_cy=self.lung_cy + rng.uniform(-0.01, 0.01),
            lung_level=float(np.clip(self.lung_level + rng.uniform(-0.02, 0.02), 0.1, 0.22)),
            noise_seed=int(rng.integers(2**31)),
        )


class Canvas:
    """A float image plus its normalised coordinate grids; painters add to ``img`` in place."""

    def __init__(self, height: int, width: int, anatomy: Anatomy):
        self.h, self.w, self.a = height, width, anatomy
        v, u = np.mgrid[0:height, 0:width].astype(np.float32)
        self.u = (u + 0.5) / width
        self.v = (v + 0.5) / height
        self.img = np.zeros((height, width), np.float32)
        self.lung_mask = np.zeros((height, width), np.float32)

    def box(self, u0: float, v0: float, u1: float, v1: float) -> Box:
        """Normalised extent to a pixel box clipped to the image."""
        x0, x1 = sorted((float(np.clip(u0, 0, 1)) * self.w, float(np.clip(u1, 0, 1)) * self.w))
        y0, y1 = sorted((float(np.clip(v0, 0, 1)) * self.h, float(np.clip(v1, 0, 1)) * self.h))
        return (x0, y0, min(x1, self.w - 1.0), min(y1, self.h - 1.0))


def _ellipse(c: Canvas, cu: float, cv: float, ru: float, rv: float, soft: float = 0.08) -> np.ndarray:
    """Soft-edged ellipse mask in [0, 1] (``soft`` is the edge width relative to the radius)."""
    d = np.sqrt(((c.u - cu) / ru) ** 2 + ((c.v - cv) / rv) ** 2)
    return np.clip((1.0 + soft - d) / (2 * soft), 0.0, 1.0)


def _gauss(c: Canvas, cu: float, cv: float, su: float, sv: float) -> np.ndarray:
    return np.exp(-0.5 * (((c.u - cu) / su) ** 2 + ((c.v - cv) / sv) ** 2))


def smooth_noise(height: int, width: int, cells: int, seed: int) -> np.ndarray:
    """Zero-mean smooth noise (bicubic upsampling of a coarse random grid), std about 1."""
    rng = np.random.default_rng(seed)
    gh, gw = max(2, round(cells * height / max(height, width))), max(2, round(cells * width / max(height, width)))
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    up = np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BICUBIC))
    return (up - up.mean()) / (up.std() + 1e-6)


def render_anatomy(c: Canvas, heart_scale: float = 1.0, lung_scale: float = 1.0, lung_darkening: float = 0.0) -> None:
    """Body, lungs, mediastinum, heart, spine, ribs, diaphragm and soft noise onto ``c.img``."""
    a = c.a
    body = _ellipse(c, a.cx, a.cy, a.body_rx, a.body_ry, soft=0.04)
    img = 0.04 + body * (a.tissue_level - 0.04)
    # Lungs: air lowers the attenuation; lower-lobe bases are domed by the diaphragm.
    lungs = np.zeros_like(img)
    for side in (0, 1):
        lu, lv = a.lung_center(side)
        lungs = np.maximum(lungs, _ellipse(c, lu, lv, a.lung_rx * lung_scale, a.lung_ry * lung_scale, soft=0.1))
    c.lung_mask = lungs
    img = img - lungs * (a.tissue_level - a.lung_level + lung_darkening)
    # Mediastinum and spine over the midline.
    medi = _ellipse(c, a.cx, a.lung_cy - 0.02, 0.055, a.lung_ry * 1.05, soft=0.2)
    img = np.maximum(img, medi * (a.tissue_level + 0.1))
    spine = np.clip(1 - np.abs(c.u - a.cx) / 0.032, 0, 1) ** 0.5 * (c.v > 0.12) * (c.v < 0.95)
    vertebrae = 0.75 + 0.25 * np.cos(2 * np.pi * c.v / 0.045)
    img = img + 0.12 * spine * vertebrae
    # Heart shadow: its width is what Cardiomegaly changes.
    heart = _ellipse(c, a.heart_cx, a.heart_cy, a.heart_rx * heart_scale, a.heart_ry * (0.5 + 0.5 * heart_scale),
                     soft=0.12)
    img = np.maximum(img, heart * (a.tissue_level + 0.14))
    # Diaphragm / abdomen below the lung bases.
    base = a.lung_cy + a.lung_ry * lung_scale * 0.93
    abdomen = np.clip((c.v - base - 0.06 * np.cos(np.pi * (c.u - a.cx) / 0.5)) / 0.03, 0, 1) * body
    img = np.maximum(img, abdomen * (a.tissue_level + 0.06))
    # Posterior ribs: curved bright bands, visible over the lungs.
    ribs = np.zeros_like(img)
    for k in range(10):
        v0 = 0.2 + a.rib_phase + 0.055 * k
        curve = v0 + 0.9 * (c.u - a.cx) ** 2
        ribs = np.maximum(ribs, np.clip(1 - np.abs(c.v - curve) / 0.009, 0, 1))
    img = img + 0.08 * ribs * np.clip(lungs * 1.3, 0, 1)
    # Clavicles.
    for sgn in (-1, 1):
        clav = np.clip(1 - np.abs(c.v - (0.17 - 0.12 * np.abs(c.u - a.cx))) / 0.012, 0, 1)
        clav = clav * (sgn * (c.u - a.cx) > 0.02) * (np.abs(c.u - a.cx) < 0.3)
        img = img + 0.12 * clav
    img = img + 0.02 * smooth_noise(c.h, c.w, 12, a.noise_seed) * body
    c.img = img.astype(np.float32)


# --- lesion painters -----------------------------------------------------------------------------
# Each takes (canvas, rng) and returns a pixel box. Intensity changes are large compared with the
# noise so the lesions are learnable; placements follow where radiologists see them.

def paint_aortic_enlargement(c: Canvas, rng: np.random.Generator) -> Box:
    """Bulging aortic knob: a bright round bump left of the upper mediastinum (image right)."""
    a = c.a
    cu, cv = a.cx + 0.06 + rng.uniform(-0.01, 0.01), 0.27 + rng.uniform(-0.02, 0.02)
    r = rng.uniform(0.045, 0.06)
    c.img = np.maximum(c.img, _ellipse(c, cu, cv, r, r * 1.1, soft=0.1) * (a.tissue_level + 0.2))
    return c.box(cu - r, cv - r * 1.1, cu + r, cv + r * 1.1)


def paint_cardiomegaly(c: Canvas, rng: np.random.Generator) -> Box:
    """Enlarged heart: a wide, dense cardiac shadow (cardiothoracic ratio well above 0.5)."""
    a = c.a
    s = rng.uniform(1.4, 1.6)
    rx, ry = a.heart_rx * s, a.heart_ry * (0.5 + 0.5 * s)
    heart = _ellipse(c, a.heart_cx, a.heart_cy, rx, ry, soft=0.08)
    c.img = np.maximum(c.img, heart * (a.tissue_level + 0.2))
    return c.box(a.heart_cx - rx, a.heart_cy - ry * 0.85, a.heart_cx + rx, a.heart_cy + ry * 0.9)


def paint_pleural_effusion(c: Canvas, rng: np.random.Generator, side: int | None = None) -> Box:
    """Fluid in a lung base: bright, with a meniscus rising towards the lateral chest wall."""
    a = c.a
    side = int(rng.integers(2)) if side is None else side
    lu, lv = a.lung_center(side)
    lateral = -1 if side == 0 else 1
    top = lv + a.lung_ry * rng.uniform(0.25, 0.45)
    meniscus = top - 0.08 * np.clip(lateral * (c.u - lu) / a.lung_rx, -1, 1)
    fluid = np.clip((c.v - meniscus) / 0.02, 0, 1) * np.clip(c.lung_mask * 1.5, 0, 1)
    fluid = fluid * (np.abs(c.u - lu) < a.lung_rx * 1.05)
    c.img = np.maximum(c.img, fluid * (a.tissue_level + 0.2))
    u0, u1 = lu - a.lung_rx, lu + a.lung_rx
    return c.box(u0, top - 0.08, u1, lv + a.lung_ry * 0.98)


def _in_lung_point(c: Canvas, rng: np.random.Generator, margin: float) -> tuple[float, float, int]:
    a = c.a
    side = int(rng.integers(2))
    lu, lv = a.lung_center(side)
    t = rng.uniform(0, 2 * np.pi)
    rho = np.sqrt(rng.uniform(0, 1)) * (1 - margin)
    return lu + rho * np.cos(t) * a.lung_rx * 0.8, lv + rho * np.sin(t) * a.lung_ry * 0.75, side


def paint_nodule(c: Canvas, rng: np.random.Generator, r_range=(0.018, 0.045)) -> Box:
    """Nodule/mass: a well-defined, round bright disc inside a lung field."""
    cu, cv, _ = _in_lung_point(c, rng, 0.3)
    r = rng.uniform(*r_range)
    rv = r * c.w / c.h  # round in pixels whatever the aspect ratio
    c.img = c.img + _ellipse(c, cu, cv, r, rv, soft=0.15) * 0.3
    return c.box(cu - r, cv - rv, cu + r, cv + rv)


def paint_lung_opacity(c: Canvas, rng: np.random.Generator) -> Box:
    """Lung opacity: a large, ill-defined hazy patch (Gaussian profile) in a lung field."""
    cu, cv, _ = _in_lung_point(c, rng, 0.4)
    su, sv = rng.uniform(0.035, 0.05), rng.uniform(0.04, 0.06)
    texture = 1 + 0.25 * smooth_noise(c.h, c.w, 20, int(rng.integers(2**31)))
    c.img = c.img + 0.34 * _gauss(c, cu, cv, su, sv) * texture
    return c.box(cu - 1.6 * su, cv - 1.6 * sv, cu + 1.6 * su, cv + 1.6 * sv)


def paint_pleural_thickening(c: Canvas, rng: np.random.Generator) -> Box:
    """Pleural thickening: a bright band hugging the lateral/apical lung wall."""
    a = c.a
    side = int(rng.integers(2))
    lu, lv = a.lung_center(side)
    v0 = lv - a.lung_ry * rng.uniform(0.55, 0.8)
    v1 = v0 + rng.uniform(0.12, 0.2)
    d = np.sqrt(((c.u - lu) / a.lung_rx) ** 2 + ((c.v - lv) / a.lung_ry) ** 2)
    band = np.clip(1.5 - np.abs(d - 0.9) / 0.08, 0, 1) * (c.v > v0) * (c.v < v1)
    band = band * ((c.u - lu) * (1 if side == 1 else -1) > -0.2 * a.lung_rx)
    c.img = np.maximum(c.img, band * (a.tissue_level + 0.25))
    ys, xs = np.nonzero(band > 0.3)
    if len(xs) == 0:  # degenerate geometry: fall back to the nominal band extent
        return c.box(lu - a.lung_rx, v0, lu + a.lung_rx, v1)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def paint_pneumothorax(c: Canvas, rng: np.random.Generator) -> Box:
    """Pneumothorax: a black, featureless rim of air between chest wall and collapsed lung."""
    a = c.a
    side = int(rng.integers(2))
    lu, lv = a.lung_center(side)
    d = np.sqrt(((c.u - lu) / a.lung_rx) ** 2 + ((c.v - lv) / a.lung_ry) ** 2)
    rim = (d > 0.7) * (c.lung_mask > 0.5) * (c.v < lv + 0.05)
    rim = rim * ((c.u - lu) * (1 if side == 1 else -1) > -0.3 * a.lung_rx)
    c.img = np.where(rim, a.lung_level * 0.35, c.img).astype(np.float32)
    ys, xs = np.nonzero(rim)
    if len(xs) == 0:
        return c.box(lu - a.lung_rx, lv - a.lung_ry, lu + a.lung_rx, lv)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def paint_atelectasis(c: Canvas, rng: np.random.Generator) -> Box:
    """Plate atelectasis: a short, thick horizontal bright band in a lower zone."""
    a = c.a
    side = int(rng.integers(2))
    lu, lv = a.lung_center(side)
    cv = lv + a.lung_ry * rng.uniform(0.2, 0.45)
    half = a.lung_rx * rng.uniform(0.5, 0.7)
    tilt = rng.uniform(-0.15, 0.15)
    band = np.clip(1 - np.abs(c.v - cv - tilt * (c.u - lu)) / 0.016, 0, 1) * (np.abs(c.u - lu) < half)
    c.img = c.img + 0.28 * band * np.clip(c.lung_mask * 1.5, 0, 1)
    return c.box(lu - half, cv - 0.02 - abs(tilt) * half, lu + half, cv + 0.02 + abs(tilt) * half)


def paint_infiltration(c: Canvas, rng: np.random.Generator) -> Box:
    """Infiltrates: a cluster of small patchy opacities."""
    cu, cv, _ = _in_lung_point(c, rng, 0.45)
    blobs = np.zeros_like(c.img)
    for _ in range(5):
        du, dv = rng.uniform(-0.05, 0.05), rng.uniform(-0.06, 0.06)
        blobs = np.maximum(blobs, _gauss(c, cu + du, cv + dv, 0.014, 0.016))
    c.img = c.img + 0.22 * blobs
    return c.box(cu - 0.08, cv - 0.095, cu + 0.08, cv + 0.095)


def paint_consolidation(c: Canvas, rng: np.random.Generator) -> Box:
    """Consolidation / pneumonia: a dense lobar opacity with a sharp lower-zone boundary."""
    a = c.a
    side = int(rng.integers(2))
    lu, lv = a.lung_center(side)
    cv = lv + a.lung_ry * rng.uniform(0.0, 0.35)
    ru, rv = a.lung_rx * 0.6, a.lung_ry * 0.3
    blob = _ellipse(c, lu, cv, ru, rv, soft=0.3) * np.clip(c.lung_mask * 1.3, 0, 1)
    c.img = np.maximum(c.img, blob * (a.tissue_level + 0.02))
    return c.box(lu - ru, cv - rv, lu + ru, cv + rv)


def paint_edema(c: Canvas, rng: np.random.Generator) -> Box:
    """Edema: bilateral perihilar haze (bat-wing)."""
    a = c.a
    haze = np.zeros_like(c.img)
    for side in (0, 1):
        lu, lv = a.lung_center(side)
        hu = lu + (0.35 if side == 0 else -0.35) * a.lung_rx
        haze = np.maximum(haze, _gauss(c, hu, lv + 0.02, 0.06, 0.09))
    c.img = c.img + 0.2 * haze * np.clip(c.lung_mask * 1.3, 0, 1)
    return c.box(a.cx - a.lung_dx - 0.1, a.lung_cy - 0.16, a.cx + a.lung_dx + 0.1, a.lung_cy + 0.2)


def paint_fibrosis(c: Canvas, rng: np.random.Generator) -> Box:
    """Fibrosis / ILD: coarse reticular texture in the lung fields."""
    a = c.a
    net = np.abs(np.sin(2 * np.pi * c.u / 0.025 + 3 * smooth_noise(c.h, c.w, 10, int(rng.integers(2**31)))))
    net = net * np.abs(np.sin(2 * np.pi * c.v / 0.03))
    zone = (c.v < a.lung_cy + 0.05) * np.clip(c.lung_mask * 1.3, 0, 1)
    c.img = c.img + 0.18 * net * zone
    return c.box(a.cx - a.lung_dx - a.lung_rx, a.lung_cy - a.lung_ry, a.cx + a.lung_dx + a.lung_rx, a.lung_cy + 0.05)


def paint_hernia(c: Canvas, rng: np.random.Generator) -> Box:
    """Hiatus hernia: a round retrocardiac density with an air-fluid bubble."""
    a = c.a
    cu, cv, r = a.cx + 0.02, a.heart_cy + 0.02, 0.05
    c.img = np.maximum(c.img, _ellipse(c, cu, cv, r, r, 0.1) * (a.tissue_level + 0.25))
    bubble = _ellipse(c, cu, cv - 0.015, r * 0.6, r * 0.35, 0.1) * (c.v < cv - 0.01)
    c.img = c.img - 0.25 * bubble
    return c.box(cu - r, cv - r, cu + r, cv + r)


Painter = Callable[[Canvas, np.random.Generator], Box]

#: VinDr classes that the demo draws (the other 8 of the 14 never occur, as rare classes in a
#: small sample would not). Weights are relative frequencies, loosely after VinDr-CXR's.
VINDR_PAINTERS: dict[str, tuple[Painter, float]] = {
    "Aortic enlargement": (paint_aortic_enlargement, 0.24),
    "Cardiomegaly": (paint_cardiomegaly, 0.18),
    "Pleural thickening": (paint_pleural_thickening, 0.16),
    "Pleural effusion": (paint_pleural_effusion, 0.12),
    "Nodule/Mass": (lambda c, r: paint_nodule(c, r, (0.02, 0.045)), 0.14),
    "Lung Opacity": (paint_lung_opacity, 0.16),
}

#: NIH findings: every one of the 14 has a visible sign. Weights are relative frequencies.
NIH_PAINTERS: dict[str, tuple[Painter, float]] = {
    "Atelectasis": (paint_atelectasis, 0.11),
    "Cardiomegaly": (paint_cardiomegaly, 0.08),
    "Effusion": (paint_pleural_effusion, 0.11),
    "Infiltration": (paint_infiltration, 0.12),
    "Mass": (lambda c, r: paint_nodule(c, r, (0.045, 0.07)), 0.07),
    "Nodule": (lambda c, r: paint_nodule(c, r, (0.012, 0.022)), 0.07),
    "Pneumonia": (paint_consolidation, 0.05),
    "Pneumothorax": (paint_pneumothorax, 0.07),
    "Consolidation": (paint_consolidation, 0.06),
    "Edema": (paint_edema, 0.05),
    "Emphysema": (None, 0.05),  # drawn through render_anatomy (large, dark lungs)
    "Fibrosis": (paint_fibrosis, 0.05),
    "Pleural_Thickening": (paint_pleural_thickening, 0.06),
    "Hernia": (paint_hernia, 0.04),
}
