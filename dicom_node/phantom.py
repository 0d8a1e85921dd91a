"""Synthetic CT/MR phantoms with a tumour of known shape, written as real DICOM.

A phantom is a chest-like body (skin and fat, muscle, two lungs with vessels, a heart,
an aorta, the spine and ribs, and for CT the couch) with a lobulated tumour in one lung,
touching or nearly touching the mediastinum or the chest wall. Everything is seeded:
the same ``seed`` gives the same voxels, truth mask and box (the DICOM UIDs are new on
every call, as they must be).

The anatomy is drawn in the image's own frame (millimetres from the centre of the
volume, along rows, columns and slices), so an oblique phantom is the same body imaged
in a rotated orientation. Slices are generated one at a time (each from its own seeded
noise stream), so a 300-slice 512x512 series needs no more memory than its int16 array.

Public API (used by tests, the demo and benchmarks):

* :func:`make_phantom` -> :class:`Phantom` (volume, truth mask, box prompt, modality)
* :func:`write_image_series` -> one DICOM file per slice of any :class:`Volume`
* :func:`write_phantom` -> ``images/``, ``prompt.dcm`` (``BOX_`` ROI) and ``truth.dcm`` (``GTV``)
* :func:`write_size_case` -> a large case for ``benchmarks/input_sizes.py`` and the size
  tests: any number of slices, rows/columns and slice spacing, ``n`` targets
  (``BOX_T01``...) and extra clinical ROIs holding many contour points
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import DS
from scipy import ndimage

from dicom_node import __version__
from inference.geometry import Geometry
from inference.prompts import BoxPrompt
from inference.volume import Volume

#: Default grid: 56 slices of 2.5 mm, 256 x 256 pixels of 1.5 mm (a 384 mm field of view).
DEFAULT_SHAPE = (56, 256, 256)
DEFAULT_SLICE_SPACING = 2.5
DEFAULT_FOV_MM = 384.0
#: Margin of the BOX_ prompt around the tumour on its largest slice, in mm.
BOX_MARGIN_MM = 4.0
PATIENT_NAME = "PHANTOM^STARDUST"

#: Tissue values. CT in Hounsfield units; MR in T1-weighted-like arbitrary units (0..4095).
CT_VALUES = {
    "air": -1000.0,
    "fat": -100.0,
    "muscle": 40.0,
    "mediastinum": 35.0,
    "lung": -850.0,
    "heart": 45.0,
    "blood": 50.0,
    "bone": 700.0,
    "marrow": 250.0,
    "canal": 20.0,
    "vessel": 40.0,
    "tumour": 85.0,
    "couch": 150.0,
    "couch_core": -600.0,
}
MR_VALUES = {
    "air": 0.0,
    "fat": 900.0,
    "muscle": 330.0,
    "mediastinum": 420.0,
    "lung": 25.0,
    "heart": 260.0,
    "blood": 90.0,
    "bone": 30.0,
    "marrow": 650.0,
    "canal": 180.0,
    "vessel": 90.0,
    "tumour": 560.0,
    "couch": 0.0,
    "couch_core": 0.0,
}
CT_NOISE_HU = 12.0
MR_NOISE = 14.0
#: The tumour's value in a low-contrast phantom (``contrast="low"``), close to the soft
#: tissue it touches: CT 10-15 HU above muscle and mediastinum (the noise is 12 HU), as a
#: lung tumour abutting the chest wall or the mediastinum looks without contrast agent;
#: MR 15 % above muscle and 10 % below the mediastinum, as a sarcoma against muscle on T1.
LOW_CONTRAST_TUMOUR = {"CT": 50.0, "MR": 380.0}
CONTRASTS = ("high", "low")


@dataclass
class Phantom:
    """A synthetic series with its ground truth.

    ``truth[k, i, j]`` is the tumour (bool, same grid as ``volume``); ``box`` is the box
    prompt around it on its largest slice (with a :data:`BOX_MARGIN_MM` margin).
    """

    volume: Volume
    truth: np.ndarray
    box: BoxPrompt
    modality: str
    seed: int = 0
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# The anatomy
# ---------------------------------------------------------------------------------------
@dataclass
class _Tumour:
    centre: np.ndarray  # (w, v, u) mm in the volume frame
    semi_axes: np.ndarray  # (w, v, u) mm before lobulation
    rotation: np.ndarray  # 3x3, rows: body axes of the tumour
    lobe_dirs: np.ndarray  # (n, 3) unit vectors
    lobe_amps: np.ndarray  # (n,)
    lobe_kappa: np.ndarray  # (n,): lobe width, large = narrow

    def inside(self, w: np.ndarray, v: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Whether points (mm, broadcastable arrays) lie inside the lobulated surface."""
        p = np.stack(np.broadcast_arrays(w - self.centre[0], v - self.centre[1], u - self.centre[2]), axis=-1)
        q = (p @ self.rotation.T) / self.semi_axes
        r = np.linalg.norm(q, axis=-1)
        d = q / np.maximum(r, 1e-9)[..., None]
        lob = np.exp(self.lobe_kappa * (d @ self.lobe_dirs.T - 1.0)) @ self.lobe_amps
        return r < 1.0 + lob

    @property
    def reach_mm(self) -> float:
        """A radius that surely contains the tumour."""
        return float(self.semi_axes.max() * (1.0 + np.abs(self.lobe_amps).sum()) + 1.0)


def _random_rotation(rng: np.random.Generator, max_angle_deg: float) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(-max_angle_deg, max_angle_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


class _Anatomy:
    """Seeded parameters of the body; draws one slice at a time."""

    def __init__(self, modality: str, seed: int, shape, spacing, contrast: str = "high"):
        self.modality = modality
        self.seed = seed
        self.shape = tuple(int(s) for s in shape)
        self.spacing = tuple(float(s) for s in spacing)
        nz, ny, nx = self.shape
        dz, dy, dx = self.spacing
        self.values = dict(CT_VALUES if modality == "CT" else MR_VALUES)
        if contrast == "low":
            self.values["tumour"] = LOW_CONTRAST_TUMOUR[modality]
        rng = np.random.default_rng([seed, 7])
        # in-plane coordinates of pixel centres, mm from the centre of the slice
        self.v = ((np.arange(ny) - (ny - 1) / 2.0) * dy)[:, None]  # rows: anterior (-) to posterior (+)
        self.u = ((np.arange(nx) - (nx - 1) / 2.0) * dx)[None, :]  # columns: right (-) to left (+)
        self.w0 = -(nz - 1) / 2.0 * dz  # w of slice 0 (mm along the slice axis)

        self.body_a = rng.uniform(150, 175)  # half width (left-right)
        self.body_b = rng.uniform(100, 118)  # half depth (anterior-posterior)
        self.body_phase = rng.uniform(0, 2 * np.pi, size=4)
        self.fat = rng.uniform(10, 18)  # subcutaneous fat thickness
        self.lung_a = self.body_a * rng.uniform(0.36, 0.42)
        self.lung_b = self.body_b * rng.uniform(0.66, 0.74)
        self.lung_u = self.body_a * rng.uniform(0.43, 0.48)  # centre offset of each lung
        self.lung_v = -self.body_b * 0.05
        self.lung_half_len = rng.uniform(120, 150)  # mm: lungs taper off above/below
        self.heart = (rng.uniform(-25, -10), rng.uniform(-30, -15), rng.uniform(42, 52), rng.uniform(36, 44))
        self.spine_v = self.body_b * 0.62
        self.rib_phase = rng.uniform(0, 2 * np.pi)
        self.rib_angles = np.radians(np.r_[np.linspace(-150, -35, 6), np.linspace(35, 150, 6)] + rng.uniform(-4, 4, 12))
        # vessels: tubes through the lungs, drifting slowly in-plane along w
        nv = 14
        side = np.repeat([-1.0, 1.0], nv // 2)
        self.vessels = np.column_stack(
            [
                side * self.lung_u + rng.uniform(-0.6, 0.6, nv) * self.lung_a,  # u at w=0
                self.lung_v + rng.uniform(-0.6, 0.6, nv) * self.lung_b,  # v at w=0
                rng.uniform(-0.15, 0.15, nv),
                rng.uniform(-0.15, 0.15, nv),  # du/dw, dv/dw
                rng.uniform(1.2, 2.8, nv),  # radius
            ]
        )
        self.tumour = self._make_tumour(rng)
        # vessels must not run through or touch the tumour
        c, reach = self.tumour.centre, self.tumour.reach_mm
        keep = []
        for vu, vv, su, sv, r in self.vessels:
            ws = np.linspace(c[0] - reach, c[0] + reach, 9)
            du = vu + su * ws - c[2]
            dv = vv + sv * ws - c[1]
            keep.append(np.min(np.hypot(du, dv)) > reach + r + 5)
        self.vessels = self.vessels[np.array(keep, dtype=bool)]
        self.bias = rng.uniform(-0.12, 0.12, size=3)  # MR receive-coil bias field (linear + radial)

    def _make_tumour(self, rng: np.random.Generator) -> _Tumour:
        length = rng.uniform(24.0, 38.0)  # mm in w before lobulation
        semi = np.array([length / 2.0, rng.uniform(11, 17), rng.uniform(11, 17)])
        side = rng.choice([-1.0, 1.0])
        lung_u = side * self.lung_u
        # lung semi-axes at w=0; the tumour sits near the medial (mediastinum) or lateral wall
        toward = rng.choice(["medial", "lateral", "anterior"])
        gap = rng.uniform(1.0, 4.0)
        cu, cv = lung_u, self.lung_v
        if toward == "medial":
            cu = lung_u - side * (self.lung_a - semi[2] - gap)
        elif toward == "lateral":
            cu = lung_u + side * (self.lung_a - semi[2] - gap)
        else:
            cv = self.lung_v - (self.lung_b - semi[1] - gap)
        # broad lobes and narrower bumps on the surface of a rotated ellipsoid
        n_broad, n_bump = 8, 10
        n = n_broad + n_bump
        dirs = rng.normal(size=(n, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        amps = np.r_[rng.uniform(0.12, 0.3, n_broad), rng.uniform(0.05, 0.12, n_bump)]
        amps *= rng.choice([-1.0, 1.0, 1.0], n)
        kappa = np.r_[rng.uniform(2.5, 5.0, n_broad), rng.uniform(10.0, 18.0, n_bump)]
        return _Tumour(
            centre=np.array([rng.uniform(-8, 8), cv, cu]),
            semi_axes=semi * 0.92,
            rotation=_random_rotation(rng, 25),
            lobe_dirs=dirs,
            lobe_amps=amps,
            lobe_kappa=kappa,
        )

    # -- per slice -------------------------------------------------------------------
    def w(self, k: int) -> float:
        return self.w0 + k * self.spacing[0]

    def truth_slice(self, k: int) -> np.ndarray:
        t = self.tumour
        w = self.w(k)
        out = np.zeros(self.shape[1:], dtype=bool)
        if abs(w - t.centre[0]) > t.reach_mm:
            return out
        rows = np.flatnonzero(np.abs(self.v[:, 0] - t.centre[1]) <= t.reach_mm)
        cols = np.flatnonzero(np.abs(self.u[0] - t.centre[2]) <= t.reach_mm)
        if rows.size == 0 or cols.size == 0:
            return out
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        out[r0:r1, c0:c1] = t.inside(np.float64(w), self.v[r0:r1], self.u[:, c0:c1])
        return out

    def _ellipse(self, img, cu, cv, a, b, value, angle=0.0, within=None) -> np.ndarray:
        """Paint an ellipse (centre, semi-axes in mm) into ``img`` in its bounding window;
        ``within=(a2, b2)`` paints only inside the centred ellipse with those semi-axes."""
        dy, dx = self.spacing[1], self.spacing[2]
        ny, nx = img.shape
        ext = max(a, b)
        i0 = max(int((cv - ext - self.v[0, 0]) / dy) - 1, 0)
        i1 = min(int((cv + ext - self.v[0, 0]) / dy) + 2, ny)
        j0 = max(int((cu - ext - self.u[0, 0]) / dx) - 1, 0)
        j1 = min(int((cu + ext - self.u[0, 0]) / dx) + 2, nx)
        if i0 >= i1 or j0 >= j1:
            return img
        du = self.u[:, j0:j1] - cu
        dv = self.v[i0:i1] - cv
        if angle:
            ca, sa = math.cos(angle), math.sin(angle)
            du, dv = du * ca + dv * sa, -du * sa + dv * ca
        inside = (du / a) ** 2 + (dv / b) ** 2 <= 1.0
        if within is not None:
            inside &= (self.u[:, j0:j1] / within[0]) ** 2 + (self.v[i0:i1] / within[1]) ** 2 <= 1.0
        img[i0:i1, j0:j1][inside] = value
        return img

    def slice(self, k: int) -> np.ndarray:
        """Slice ``k`` as float32 tissue values with partial volume and noise."""
        V = self.values
        w = self.w(k)
        img = np.full(self.shape[1:], V["air"], dtype=np.float32)
        p = self.body_phase
        a = self.body_a * (1 + 0.04 * math.sin(w / 90 + p[0]) + 0.02 * math.sin(w / 37 + p[1]))
        b = self.body_b * (1 + 0.04 * math.sin(w / 80 + p[2]) + 0.02 * math.sin(w / 29 + p[3]))
        if self.modality == "CT":  # couch under the patient (posterior, +v)
            self._rect(img, -1.25 * a, 1.25 * a, b + 4, b + 16, V["couch"])
            self._rect(img, -1.2 * a, 1.2 * a, b + 6, b + 14, V["couch_core"])
        self._ellipse(img, 0, 0, a, b, V["fat"])
        self._ellipse(img, 0, 0, a - self.fat, b - self.fat, V["muscle"])
        # lungs taper off towards their ends
        taper = 1.0 - (w / self.lung_half_len) ** 2
        if taper > 0.05:
            s = math.sqrt(taper)
            self._ellipse(img, 0, -0.05 * b, 0.45 * a, 0.8 * b, V["mediastinum"])
            wall = (a - self.fat - 10.0, b - self.fat - 10.0)  # the lungs stay inside the chest wall
            for side in (-1.0, 1.0):
                self._ellipse(
                    img,
                    side * self.lung_u,
                    self.lung_v,
                    self.lung_a * s,
                    self.lung_b * s,
                    V["lung"],
                    side * 0.12,
                    within=wall,
                )
            hu, hv, ha, hb = self.heart
            if abs(w) < 0.6 * self.lung_half_len:
                hs = math.sqrt(max(1 - (w / (0.6 * self.lung_half_len)) ** 2, 0.0))
                self._ellipse(img, hu, hv, ha * hs, hb * hs, V["heart"], 0.5)
            self._ellipse(img, 12, self.spine_v - 38, 12, 12, V["blood"])  # descending aorta
            for vu, vv, su, sv, r in self.vessels:
                cu, cv = vu + su * w, vv + sv * w
                if ((cu - np.sign(vu) * self.lung_u) / (self.lung_a * s)) ** 2 + (
                    (cv - self.lung_v) / (self.lung_b * s)
                ) ** 2 < 0.8:
                    self._ellipse(img, cu, cv, r, r, V["vessel"])
        # spine: vertebral body with cortical rim, canal, posterior arch
        self._ellipse(img, 0, self.spine_v, 20, 17, V["bone"])
        self._ellipse(img, 0, self.spine_v, 17, 14, V["marrow"])
        self._ellipse(img, 0, self.spine_v + 27, 13, 11, V["bone"])
        self._ellipse(img, 0, self.spine_v + 26, 8, 7, V["canal"])
        # ribs: cross-sections near the body wall, present periodically along w
        if math.sin(2 * math.pi * w / 26.0 + self.rib_phase) > -0.2:
            for ang in self.rib_angles:
                ru = (a - self.fat - 6) * math.sin(ang)
                rv = -(b - self.fat - 6) * math.cos(ang)
                self._ellipse(img, ru, rv, 6.5, 3.5, V["bone"], ang)
        truth = self.truth_slice(k)
        if truth.any():
            # the tumour's own intensity varies a little from phantom to phantom (+-6%)
            level = 1.0 + 0.06 * np.random.default_rng([self.seed, 11]).standard_normal()
            img[truth] = V["tumour"] * level
        return self._acquire(img, k)

    def _rect(self, img, u0, u1, v0, v1, value) -> None:
        rows = (self.v[:, 0] >= v0) & (self.v[:, 0] <= v1)
        cols = (self.u[0] >= u0) & (self.u[0] <= u1)
        img[np.ix_(rows, cols)] = value

    def _acquire(self, img: np.ndarray, k: int) -> np.ndarray:
        """Point spread (partial volume) and noise, seeded per slice."""
        rng = np.random.default_rng([self.seed, 1000 + k])
        noise = rng.standard_normal(img.shape, dtype=np.float32)
        sigma = 0.7  # pixels; the blur shrinks white noise sd by about 2*sqrt(pi)*sigma
        gain = 2.0 * math.sqrt(math.pi) * sigma
        if self.modality == "CT":
            out = ndimage.gaussian_filter(img + noise * (CT_NOISE_HU * gain), sigma, mode="nearest")
            return out
        # MR: smooth receive bias, then Rician magnitude noise
        r2 = (self.u / self.u.max()) ** 2 + (self.v / self.v.max()) ** 2
        bias = (
            1.0
            + self.bias[0] * self.u / self.u.max()
            + self.bias[1] * self.v / self.v.max()
            + self.bias[2] * (r2 - 0.5)
        )
        clean = ndimage.gaussian_filter(img * bias.astype(np.float32), sigma, mode="nearest")
        imag = rng.standard_normal(img.shape, dtype=np.float32) * MR_NOISE
        return np.sqrt((clean + noise * MR_NOISE) ** 2 + imag**2)


# ---------------------------------------------------------------------------------------
# Building a phantom
# ---------------------------------------------------------------------------------------
def _oblique_direction() -> np.ndarray:
    """A fixed, clearly oblique orientation: ~12 degrees about x, then ~8 about y."""
    ax, ay = math.radians(12.0), math.radians(8.0)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    r = ry @ rx
    # rows of the direction matrix: slice normal, column direction, row direction
    return np.stack([r[:, 2], r[:, 1], r[:, 0]])


def phantom_attributes(modality: str, seed: int, study_uid: str, series_uid: str, for_uid: str) -> dict:
    """Patient/study/series attributes of a phantom, as ``Volume.attributes`` holds them."""
    now = _dt.datetime.now()
    return {
        "SpecificCharacterSet": "ISO_IR 100",
        "PatientName": PATIENT_NAME,
        "PatientID": f"STARDUST-{modality}-{seed}",
        "PatientBirthDate": "",
        "PatientSex": "O",
        "StudyInstanceUID": study_uid,
        "StudyDate": now.strftime("%Y%m%d"),
        "StudyTime": now.strftime("%H%M%S"),
        "StudyID": "PHANTOM",
        "AccessionNumber": "",
        "ReferringPhysicianName": "",
        "StudyDescription": "STARDUST synthetic phantom",
        "Modality": modality,
        "SeriesInstanceUID": series_uid,
        "SeriesNumber": 1,
        "SeriesDescription": f"Phantom {modality} seed {seed}",
        "SeriesDate": now.strftime("%Y%m%d"),
        "SeriesTime": now.strftime("%H%M%S"),
        "BodyPartExamined": "CHEST",
        "PatientPosition": "HFS",
        "FrameOfReferenceUID": for_uid,
        "PositionReferenceIndicator": "",
        "Manufacturer": "STARDUST",
        "ManufacturerModelName": "dicom-node phantom",
        "SoftwareVersions": __version__,
    }


def make_phantom(
    modality: str = "CT",
    seed: int = 0,
    *,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] | None = None,
    oblique: bool = False,
    contrast: str = "high",
) -> Phantom:
    """A seeded synthetic series with a lobulated tumour, in memory.

    ``shape`` is (slices, rows, columns); ``spacing`` (dz, dy, dx) in mm defaults to
    2.5 mm slices and a 384 mm field of view. ``oblique`` images the same body in a
    rotated orientation (about 12 and 8 degrees off axial). ``contrast="low"`` gives the
    tumour a value close to the soft tissue it touches (:data:`LOW_CONTRAST_TUMOUR`); the
    seed's anatomy, tumour and noise are the same as with ``"high"``.
    """
    modality = modality.upper()
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be CT or MR, got {modality!r}")
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {', '.join(CONTRASTS)}, got {contrast!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes, got {shape}")
    if spacing is None:
        spacing = (DEFAULT_SLICE_SPACING, DEFAULT_FOV_MM / shape[1], DEFAULT_FOV_MM / shape[2])
    anatomy = _Anatomy(modality, seed, shape, spacing, contrast)

    array = np.empty(shape, dtype=np.int16)
    truth = np.zeros(shape, dtype=bool)
    hi = 3071 if modality == "CT" else 4095
    lo = -1024 if modality == "CT" else 0
    for k in range(shape[0]):
        array[k] = np.clip(np.rint(anatomy.slice(k)), lo, hi)
        truth[k] = anatomy.truth_slice(k)
    edges = (truth[0], truth[-1], truth[:, 0], truth[:, -1], truth[:, :, 0], truth[:, :, -1])
    if not truth.any() or any(e.any() for e in edges):
        raise ValueError(
            f"the tumour does not fit in a {shape[0]}x{shape[1]}x{shape[2]} volume with spacing "
            f"{tuple(round(float(s), 4) for s in spacing)} mm: it needs about 50 mm along the slices "
            "and a field of view of about 350 mm"
        )

    direction = _oblique_direction() if oblique else np.eye(3)[::-1]
    centre = np.array([0.0, 0.0, -200.0])  # patient coordinates of the volume centre
    half = (np.asarray(shape, dtype=float) - 1) / 2.0 * np.asarray(spacing, dtype=float)
    origin = centre - half @ direction
    geometry = Geometry(shape=shape, spacing=spacing, origin=origin, direction=direction)
    study_uid, series_uid, for_uid = generate_uid(), generate_uid(), generate_uid()
    volume = Volume(
        array=array,
        geometry=geometry,
        sop_instance_uids=tuple(generate_uid() for _ in range(shape[0])),
        modality=modality,
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        frame_of_reference_uid=for_uid,
        sop_class_uid=CTImageStorage if modality == "CT" else MRImageStorage,
        attributes=phantom_attributes(modality, seed, study_uid, series_uid, for_uid),
    )
    box = box_around(truth, geometry, BOX_MARGIN_MM)
    zs = np.flatnonzero(truth.any(axis=(1, 2)))
    info = {
        "tumour_slices": (int(zs[0]), int(zs[-1])),
        "tumour_extent_mm": float((zs[-1] - zs[0] + 1) * spacing[0]),
        "tumour_volume_ml": float(truth.sum() * geometry.voxel_volume_mm3 / 1000.0),
        "contrast": contrast,
    }
    return Phantom(volume=volume, truth=truth, box=box, modality=modality, seed=seed, info=info)


def box_around(truth: np.ndarray, geometry: Geometry, margin_mm: float) -> BoxPrompt:
    """The box prompt around the mask on its largest slice.

    The box is a whole number of pixels: the mask's bounding rows/columns widened by
    ``margin_mm`` (rounded outwards, clipped to the image), and its corners lie on the
    pixel *edges* (centre -/+ 0.5), which is where the contour of that rectangle of
    pixels runs in the ``BOX_`` ROI written by :func:`save_phantom`.
    """
    k = int(np.argmax(truth.sum(axis=(1, 2))))
    r0, r1, c0, c1 = _box_pixels(truth[k], geometry, margin_mm)
    return BoxPrompt(slice_index=k, i0=r0 - 0.5, j0=c0 - 0.5, i1=r1 + 0.5, j1=c1 + 0.5)


def _box_pixels(mask2d: np.ndarray, geometry: Geometry, margin_mm: float) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask2d.any(axis=1))
    cols = np.flatnonzero(mask2d.any(axis=0))
    mi = math.ceil(margin_mm / geometry.spacing[1] - 1e-9)
    mj = math.ceil(margin_mm / geometry.spacing[2] - 1e-9)
    ny, nx = mask2d.shape
    return (
        max(int(rows[0]) - mi, 0),
        min(int(rows[-1]) + mi, ny - 1),
        max(int(cols[0]) - mj, 0),
        min(int(cols[-1]) + mj, nx - 1),
    )


def box_mask(phantom: Phantom) -> np.ndarray:
    """The ``BOX_`` ROI as a mask: the rectangle of pixels of ``phantom.box`` on its slice."""
    box = phantom.box
    mask = np.zeros(phantom.truth.shape, dtype=bool)
    mask[
        box.slice_index, round(box.i0 + 0.5) : round(box.i1 - 0.5) + 1, round(box.j0 + 0.5) : round(box.j1 - 0.5) + 1
    ] = True
    return mask


# ---------------------------------------------------------------------------------------
# Writing DICOM images
# ---------------------------------------------------------------------------------------
def _ds(value: float) -> DS:
    """A decimal string of at most 16 characters."""
    return DS(float(value), auto_format=True)


def _pixel_encoding(volume: Volume) -> dict:
    """How the volume's values are stored: representation, bits, rescale."""
    arr = volume.array
    lo, hi = float(arr.min()), float(arr.max())
    integral = np.issubdtype(arr.dtype, np.integer) or bool(np.all(np.mod(arr, 1) == 0))
    if integral and volume.modality == "CT" and lo >= -1024 and hi <= 65535 - 1024:
        return {"signed": False, "slope": 1.0, "intercept": -1024.0, "max_stored": hi + 1024}
    if integral and lo >= 0 and hi <= 65535:
        return {"signed": False, "slope": 1.0, "intercept": 0.0, "max_stored": hi}
    if integral and lo >= -32768 and hi <= 32767:
        return {"signed": True, "slope": 1.0, "intercept": 0.0, "max_stored": max(hi, -lo - 1)}
    # real values: quantise to 16 bits over the volume's range (lossy, documented)
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    return {"signed": False, "slope": slope, "intercept": lo, "max_stored": 65535}


_SET_FROM_VOLUME = {"StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "Modality", "SOPClassUID"}


def _base_dataset(volume: Volume, enc: dict) -> Dataset:
    attrs = dict(volume.attributes)
    g = volume.geometry
    modality = volume.modality
    now = _dt.datetime.now()
    ds = Dataset()
    ds.SpecificCharacterSet = attrs.get("SpecificCharacterSet", "ISO_IR 100")
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"] if modality == "CT" else ["DERIVED", "SECONDARY", "OTHER"]
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.SOPClassUID = volume.sop_class_uid
    ds.StudyDate = attrs.get("StudyDate", "")
    ds.SeriesDate = attrs.get("SeriesDate", ds.StudyDate)
    ds.ContentDate = ds.SeriesDate
    ds.StudyTime = attrs.get("StudyTime", "")
    ds.SeriesTime = attrs.get("SeriesTime", ds.StudyTime)
    ds.ContentTime = ds.SeriesTime
    ds.AccessionNumber = attrs.get("AccessionNumber", "")
    ds.Modality = modality
    ds.Manufacturer = attrs.get("Manufacturer", "STARDUST")
    # everything else the volume carries (patient, study, series, equipment attributes)
    for keyword, value in attrs.items():
        if keyword not in ds and value not in ("", None, []) and keyword not in _SET_FROM_VOLUME:
            setattr(ds, keyword, value)
    ds.ReferringPhysicianName = attrs.get("ReferringPhysicianName", "")
    ds.PatientName = attrs.get("PatientName", "")
    ds.PatientID = attrs.get("PatientID", "")
    ds.PatientBirthDate = attrs.get("PatientBirthDate", "")
    ds.PatientSex = attrs.get("PatientSex", "")
    ds.SliceThickness = _ds(g.spacing[0])
    ds.SpacingBetweenSlices = _ds(g.spacing[0])
    if modality == "CT":
        ds.KVP = "120"
        ds.GantryDetectorTilt = "0"
        ds.ConvolutionKernel = "STANDARD"
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "12"
        ds.EchoTrainLength = "1"
        ds.MagneticFieldStrength = "1.5"
        ds.ImagedNucleus = "1H"
    ds.PatientPosition = attrs.get("PatientPosition", "HFS")
    ds.StudyInstanceUID = volume.study_instance_uid
    ds.SeriesInstanceUID = volume.series_instance_uid
    ds.StudyID = attrs.get("StudyID", "")
    ds.SeriesNumber = attrs.get("SeriesNumber", 1)
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [_ds(v) for v in g.image_orientation]
    ds.FrameOfReferenceUID = volume.frame_of_reference_uid
    ds.PositionReferenceIndicator = attrs.get("PositionReferenceIndicator", "")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = g.shape[1], g.shape[2]
    ds.PixelSpacing = [_ds(v) for v in g.pixel_spacing]
    bits = 12 if enc["max_stored"] < 4096 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 1 if enc["signed"] else 0
    if modality == "CT":
        ds.WindowCenter, ds.WindowWidth = "40", "400"
    else:
        hi = float(np.percentile(volume.array[:: max(1, g.shape[0] // 8)], 99.5))
        ds.WindowCenter, ds.WindowWidth = _ds(hi / 2), _ds(max(hi, 1.0))
    if modality == "CT" or enc["slope"] != 1.0 or enc["intercept"] != 0.0:
        ds.RescaleIntercept = _ds(enc["intercept"])
        ds.RescaleSlope = _ds(enc["slope"])
        if modality == "CT":
            ds.RescaleType = "HU"
    return ds


def write_image_series(volume: Volume, outdir: str | Path, *, prefix: str = "") -> list[Path]:
    """Write ``volume`` as one single-frame DICOM file per slice (explicit VR little endian).

    Geometry (oblique too), UIDs and patient/study attributes come from the volume, so
    ``load_series`` of the files gives back the same grid, values and UIDs. Integer values
    are stored exactly (CT with RescaleIntercept -1024); real values are quantised to
    16 bits over the volume's range. Files are named ``<prefix><modality>_<k+1:04d>.dcm``.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    enc = _pixel_encoding(volume)
    base = _base_dataset(volume, enc)
    g = volume.geometry
    dtype = np.int16 if enc["signed"] else np.uint16
    paths = []
    for k, sop_uid in enumerate(volume.sop_instance_uids):
        ds = Dataset()
        ds.update(base)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = volume.sop_class_uid
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        position = g.slice_position(k)
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.SliceLocation = _ds(float(position @ g.normal))
        values = volume.array[k]
        if enc["slope"] == 1.0:
            stored = (values.astype(np.int32) - int(enc["intercept"])).astype(dtype)
        else:
            stored = np.clip(np.rint((values.astype(np.float64) - enc["intercept"]) / enc["slope"]), 0, 65535).astype(
                dtype
            )
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
        path = outdir / f"{prefix}{volume.modality}_{k + 1:04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------
# Writing a phantom with its RTSTRUCTs
# ---------------------------------------------------------------------------------------
def write_phantom(outdir: str | Path, modality: str = "CT", seed: int = 0, **kw) -> dict[str, Path]:
    """Write ``images/``, ``prompt.dcm`` (a ``BOX_`` ROI on the tumour's largest slice)
    and ``truth.dcm`` (the tumour as ``GTV``) under ``outdir``. Keyword arguments go to
    :func:`make_phantom`. Returns ``{"images": dir, "prompt": file, "truth": file}``."""
    return save_phantom(make_phantom(modality, seed, **kw), outdir)


_SLICE_NAME = re.compile(r"(CT|MR)_\d{4}\.dcm")


def save_phantom(phantom: Phantom, outdir: str | Path, *, rtstructs: bool = True) -> dict[str, Path]:
    """Write a phantom made by :func:`make_phantom` (see :func:`write_phantom`);
    ``rtstructs=False`` writes the images only. Slice files of an earlier phantom in
    ``outdir/images`` (``CT_0001.dcm``...) are removed first; other files are left alone."""
    outdir = Path(outdir)
    images = outdir / "images"
    if images.is_dir():  # an earlier phantom here: its slices must not mix with this series
        for old in images.iterdir():
            if _SLICE_NAME.fullmatch(old.name) and old.is_file():
                old.unlink()
    write_image_series(phantom.volume, images)
    paths: dict[str, Path] = {"images": images}
    if not rtstructs:
        return paths
    from rtstruct.writer import RoiMask, write_rtstruct  # the writer pulls in highdicom

    algorithm = {"algorithm_name": "STARDUST phantom", "algorithm_version": __version__}
    prompt = write_rtstruct(
        phantom.volume,
        [
            RoiMask(
                "BOX_",
                box_mask(phantom),
                color=(255, 255, 0),
                interpreted_type="CONTROL",
                description="box prompt around the tumour",
                **algorithm,
            )
        ],
        label="PHANTOM_PROMPT",
        series_description="STARDUST phantom prompt",
        series_number=801,
    )
    truth = write_rtstruct(
        phantom.volume,
        [
            RoiMask(
                "GTV",
                phantom.truth,
                color=(255, 0, 0),
                interpreted_type="GTV",
                description="true tumour of the phantom",
                **algorithm,
            )
        ],
        label="PHANTOM_TRUTH",
        series_description="STARDUST phantom truth",
        series_number=802,
    )
    for name, ds in (("prompt", prompt), ("truth", truth)):
        path = outdir / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths[name] = path
    return paths


# ---------------------------------------------------------------------------------------
# Large cases (input sizes)
# ---------------------------------------------------------------------------------------
def add_clinical_rois(ds: Dataset, volume: Volume, n_rois: int, points: int, *, per_contour: int = 1000) -> int:
    """Add ``n_rois`` clinical ROIs (``ORGAN_001``..., type ORGAN) to the RTSTRUCT ``ds``
    drawn on ``volume``: together about ``points`` contour points, as closed circles of
    ``per_contour`` points on consecutive slices. Returns the number of points added."""
    from pydicom.sequence import Sequence as DicomSequence

    g = volume.geometry
    n_slices, rows, cols = volume.shape
    per_roi = max(3, points // max(n_rois, 1))
    numbers = [int(item.ROINumber) for item in ds.StructureSetROISequence]
    number = max(numbers, default=0)
    added = 0
    for r in range(n_rois):
        number += 1
        name = f"ORGAN_{r + 1:03d}"
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = volume.frame_of_reference_uid
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "MANUAL"
        ds.StructureSetROISequence.append(roi)
        contours = []
        left = per_roi
        k = (r * 7) % n_slices
        while left > 0:
            n = left if left < per_contour + 3 else per_contour
            t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
            radius = 0.2 + 0.15 * ((r % 5) / 5)
            idx = np.column_stack(
                [np.full(n, float(k)), rows * (0.5 + radius * np.sin(t)), cols * (0.5 + radius * np.cos(t))]
            )
            xyz = g.index_to_patient(idx)
            c = Dataset()
            ref = Dataset()
            ref.ReferencedSOPClassUID = volume.sop_class_uid
            ref.ReferencedSOPInstanceUID = volume.sop_instance_uids[k]
            c.ContourImageSequence = DicomSequence([ref])
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = n
            c.ContourData = [f"{v:.2f}" for v in xyz.ravel()]
            contours.append(c)
            left -= n
            added += n
            k = (k + 1) % n_slices
        item = Dataset()
        item.ReferencedROINumber = number
        item.ROIDisplayColor = [0, 128 + (r % 128), 255 - (r % 128)]
        item.ContourSequence = DicomSequence(contours)
        ds.ROIContourSequence.append(item)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = "ORGAN"
        obs.ROIInterpreter = ""
        ds.RTROIObservationsSequence.append(obs)
    return added


def write_size_case(
    outdir: str | Path,
    *,
    slices: int = 100,
    rows: int = 512,
    slice_spacing: float = DEFAULT_SLICE_SPACING,
    targets: int = 1,
    clinical_rois: int = 0,
    contour_points: int = 0,
    seed: int = 0,
) -> dict:
    """Write a CT phantom of ``slices`` x ``rows`` x ``rows`` (a 384 mm field of view,
    ``slice_spacing`` mm) with ``prompt.dcm``: ``targets`` box prompts on the tumour
    (``BOX_`` for one, else ``BOX_T01``..., all the same box) plus ``clinical_rois`` ROIs
    holding ``contour_points`` points (:func:`add_clinical_rois`). Slices are made and
    written one at a time, so a 1000-slice 1024x1024 series never is in memory at once.
    Returns ``{"images", "prompt", "voxels", "points", "tumour_slices"}``."""
    from rtstruct.writer import RoiMask, write_rtstruct

    outdir = Path(outdir)
    shape = (int(slices), int(rows), int(rows))
    spacing = (float(slice_spacing), DEFAULT_FOV_MM / rows, DEFAULT_FOV_MM / rows)
    anatomy = _Anatomy("CT", seed, shape, spacing)
    # the tumour's slices (only those near its centre are drawn)
    w = np.array([anatomy.w(k) for k in range(shape[0])])
    truth_slices = {}
    for k in range(shape[0]):
        if abs(w[k] - anatomy.tumour.centre[0]) <= anatomy.tumour.reach_mm:
            t = anatomy.truth_slice(k)
            if t.any():
                truth_slices[k] = t
    if not truth_slices:
        raise ValueError(f"the tumour does not fit in a {shape} volume with spacing {spacing} mm")
    direction = np.eye(3)[::-1]
    centre = np.array([0.0, 0.0, -200.0])
    half = (np.asarray(shape, dtype=float) - 1) / 2.0 * np.asarray(spacing, dtype=float)
    geometry = Geometry(shape=shape, spacing=spacing, origin=centre - half @ direction, direction=direction)
    study_uid, series_uid, for_uid = generate_uid(), generate_uid(), generate_uid()
    uids = tuple(generate_uid() for _ in range(shape[0]))
    attributes = phantom_attributes("CT", seed, study_uid, series_uid, for_uid)
    images = outdir / "images"
    images.mkdir(parents=True, exist_ok=True)
    for k in range(shape[0]):  # one slice at a time: a one-slice volume per file
        one = Geometry(shape=(1, rows, rows), spacing=spacing, origin=geometry.slice_position(k), direction=direction)
        arr = np.clip(np.rint(anatomy.slice(k)), -1024, 3071).astype(np.int16)[None]
        vol = Volume(arr, one, (uids[k],), "CT", series_uid, study_uid, for_uid, CTImageStorage, dict(attributes))
        (path,) = write_image_series(vol, images, prefix="tmp_")
        path.rename(images / f"CT_{k + 1:04d}.dcm")
    # the prompt RTSTRUCT on a volume that holds only the geometry and UIDs (no pixels needed)
    empty = np.broadcast_to(np.int16(0), shape)  # no memory: the writer needs the grid, not the values
    ref = Volume(empty, geometry, uids, "CT", series_uid, study_uid, for_uid, CTImageStorage, attributes)
    largest = max(truth_slices, key=lambda k: int(truth_slices[k].sum()))
    r0, r1, c0, c1 = _box_pixels(truth_slices[largest], geometry, BOX_MARGIN_MM)
    box = np.zeros(shape, dtype=bool)
    box[largest, r0 : r1 + 1, c0 : c1 + 1] = True
    names = ["BOX_"] if targets == 1 else [f"BOX_T{i + 1:02d}" for i in range(targets)]
    algorithm = {"algorithm_name": "STARDUST phantom", "algorithm_version": __version__}
    prompt = write_rtstruct(
        ref,
        [RoiMask(n, box, color=(255, 255, 0), interpreted_type="CONTROL", **algorithm) for n in names],
        label="PHANTOM_PROMPT",
        series_description="STARDUST phantom prompt",
        series_number=801,
    )
    del box
    points = add_clinical_rois(prompt, ref, clinical_rois, contour_points) if clinical_rois else 0
    path = outdir / "prompt.dcm"
    prompt.save_as(path, enforce_file_format=True)
    return {
        "images": images,
        "prompt": path,
        "voxels": int(np.prod(shape)),
        "points": points,
        "tumour_slices": (min(truth_slices), max(truth_slices)),
    }
