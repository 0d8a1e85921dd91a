"""QA pictures of a result: the contour over the image, as the planner checks it.

For every target of a result, :func:`qa_pictures` draws the prompted slice(s) and a few
slices across the result's extent (its first and last slice and evenly spaced ones
between, at most :data:`MAX_PER_TARGET` in all): the image in the rule's window (the
engine's input: CT level/width, MR percentiles), the result's outline in the ROI's
colour, the planner's box (yellow) and clicks (green +, magenta x) on the slices where
they were drawn, and a caption with the ROI name, slice number, position and area. The
picture is cropped around the target (with a margin, at least 80 mm across) at the true
pixel aspect ratio.

The pictures are PNG files written with the result (``results/<job>/qa/``), shown on the
case page, and, with the rule output ``overlay``, sent as a DICOM Secondary Capture series
(:mod:`rtstruct.secondary_capture`). They carry no patient name or ID.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["QaPicture", "qa_pictures", "pick_slices", "MAX_PER_TARGET"]

#: pictures per target (prompted slices first; then the extent's ends and between)
MAX_PER_TARGET = 6
_SIZE = 384  # the longer side of the image part, pixels
_CAPTION = 44  # height of the caption band, pixels
_BOX = (255, 214, 0)
_POSITIVE = (40, 220, 40)
_NEGATIVE = (230, 40, 230)


@dataclass(frozen=True)
class QaPicture:
    """One picture: an RGB array and what it shows."""

    roi: str
    slice_index: int  # k, 0-based, in the sorted series
    slice_count: int
    position_mm: float  # the slice's position along its normal (ImagePositionPatient . normal)
    area_mm2: float  # of the result on this slice
    prompted: bool
    score: float | None
    rgb: np.ndarray  # uint8 (rows, columns, 3)

    @property
    def file_name(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.roi)
        return f"qa-{safe}-{self.slice_index + 1:04d}.png"

    def png(self) -> bytes:
        from PIL import Image

        out = io.BytesIO()
        Image.fromarray(self.rgb, "RGB").save(out, format="PNG", optimize=False)
        return out.getvalue()

    def facts(self) -> dict:
        """What the case page shows beside the picture (JSON)."""
        return {
            "file": self.file_name,
            "roi": self.roi,
            "slice": self.slice_index,
            "position_mm": round(self.position_mm, 2),
            "area_mm2": round(self.area_mm2, 1),
            "prompted": self.prompted,
            "score": None if self.score is None else round(self.score, 3),
        }


def pick_slices(kept: Sequence[int], anchors: Sequence[int], limit: int = MAX_PER_TARGET) -> list[int]:
    """The slices to show: the prompted ones, the first and last kept, evenly spaced between."""
    kept = sorted(set(int(k) for k in kept))
    chosen = list(dict.fromkeys(int(a) for a in anchors))[:limit]
    if kept:
        wanted = max(0, limit - len(chosen))
        candidates = [kept[0], kept[-1]] + [
            kept[int(round(i * (len(kept) - 1) / (wanted - 1)))] for i in range(1, wanted - 1) if wanted > 2
        ]
        for k in candidates:
            if len(chosen) >= limit:
                break
            if k not in chosen:
                chosen.append(k)
    return sorted(chosen)


def _crop(mask: np.ndarray, boxes, points, spacing_yx: tuple[float, float], shape_yx: tuple[int, int]):
    """Rows and columns around the target: its extent on every slice and its prompts, plus a margin."""
    rows = np.flatnonzero(mask.any(axis=(0, 2)))
    cols = np.flatnonzero(mask.any(axis=(0, 1)))
    r = [float(rows[0]), float(rows[-1])] if rows.size else []
    c = [float(cols[0]), float(cols[-1])] if cols.size else []
    for b in boxes:
        r += [b.i0, b.i1]
        c += [b.j0, b.j1]
    for p in points:
        r.append(p.i)
        c.append(p.j)
    ny, nx = shape_yx
    if not r:
        return 0, ny, 0, nx
    dy, dx = spacing_yx
    height_mm = (max(r) - min(r) + 1) * dy
    width_mm = (max(c) - min(c) + 1) * dx
    side_mm = max(80.0, 1.6 * max(height_mm, width_mm))  # square field, the target in the middle
    ci, cj = (min(r) + max(r)) / 2, (min(c) + max(c)) / 2
    hi, hj = side_mm / dy / 2, side_mm / dx / 2
    r0, r1 = int(np.floor(ci - hi)), int(np.ceil(ci + hi)) + 1
    c0, c1 = int(np.floor(cj - hj)), int(np.ceil(cj + hj)) + 1
    return max(0, r0), min(ny, r1), max(0, c0), min(nx, c1)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _draw(
    gray: np.ndarray,
    mask: np.ndarray,
    crop: tuple[int, int, int, int],
    spacing_yx: tuple[float, float],
    color: tuple[int, int, int],
    boxes,
    points,
    lines: list[str],
) -> np.ndarray:
    from PIL import Image, ImageDraw
    from skimage import measure

    r0, r1, c0, c1 = crop
    dy, dx = spacing_yx
    h_mm, w_mm = (r1 - r0) * dy, (c1 - c0) * dx
    scale = _SIZE / max(h_mm, w_mm)
    out_w, out_h = max(1, round(w_mm * scale)), max(1, round(h_mm * scale))
    sy, sx = out_h / (r1 - r0), out_w / (c1 - c0)
    image = Image.fromarray(np.ascontiguousarray(gray[r0:r1, c0:c1])).resize((out_w, out_h), Image.BILINEAR)
    canvas = Image.new("RGB", (out_w, out_h + _CAPTION), (0, 0, 0))
    canvas.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)

    def xy(i: float, j: float) -> tuple[float, float]:  # voxel centre (row i, column j) -> picture
        return ((j - c0 + 0.5) * sx, (i - r0 + 0.5) * sy)

    part = np.pad(mask[r0:r1, c0:c1].astype(np.float32), 1)
    for contour in measure.find_contours(part, 0.5):
        pts = [xy(i - 1 + r0, j - 1 + c0) for i, j in contour]
        if len(pts) > 1:
            draw.line(pts + [pts[0]], fill=tuple(color), width=2)
    for b in boxes:
        (x0, y0), (x1, y1) = xy(b.i0 - 0.5, b.j0 - 0.5), xy(b.i1 + 0.5, b.j1 + 0.5)
        draw.rectangle([x0, y0, x1, y1], outline=_BOX, width=1)
    for p in points:
        x, y = xy(p.i, p.j)
        if p.positive:
            draw.line([(x - 6, y), (x + 6, y)], fill=_POSITIVE, width=2)
            draw.line([(x, y - 6), (x, y + 6)], fill=_POSITIVE, width=2)
        else:
            draw.line([(x - 5, y - 5), (x + 5, y + 5)], fill=_NEGATIVE, width=2)
            draw.line([(x - 5, y + 5), (x + 5, y - 5)], fill=_NEGATIVE, width=2)
    font = _font(14)
    for n, line in enumerate(lines[:2]):
        draw.text((6, out_h + 5 + n * 19), line, fill=(235, 235, 235), font=font)
    return np.asarray(canvas, dtype=np.uint8)


def qa_pictures(volume, targets, window: tuple[float, float] | None, color: Sequence[int]) -> list[QaPicture]:
    """The QA pictures of every target (``targets``: :class:`dicom_node.pipeline.TargetResult`)."""
    from inference.preprocess import to_uint8

    gray = to_uint8(volume.array, volume.modality, window)
    nz, ny, nx = volume.shape
    dz, dy, dx = volume.spacing
    geometry = volume.geometry
    normal = np.asarray(geometry.normal, dtype=float)
    pictures: list[QaPicture] = []
    for t in targets:
        mask = np.asarray(t.result.mask, dtype=bool)
        prompts = t.target
        kept = np.flatnonzero(mask.any(axis=(1, 2)))
        anchors = [k for k in prompts.anchor_slices if 0 <= k < nz]
        crop = _crop(mask, prompts.boxes, prompts.points, (dy, dx), (ny, nx))
        for k in pick_slices(kept, anchors):
            area = float(mask[k].sum()) * dy * dx
            boxes = [b for b in prompts.boxes if b.slice_index == k]
            points = [p for p in prompts.points if p.slice_index == k]
            score = t.result.slice_scores.get(k)
            position = float(np.dot(geometry.slice_position(k), normal))
            lines = [
                f"{t.roi_name}   slice {k + 1} of {nz}   at {position:.1f} mm",
                f"area {area:.0f} mm2"
                + (f"   score {score:.2f}" if score is not None else "")
                + ("   prompted" if k in anchors else ""),
            ]
            rgb = _draw(gray[k], mask[k], crop, (dy, dx), tuple(int(v) for v in color), boxes, points, lines)
            pictures.append(
                QaPicture(
                    roi=t.roi_name,
                    slice_index=int(k),
                    slice_count=nz,
                    position_mm=position,
                    area_mm2=area,
                    prompted=k in anchors,
                    score=None if score is None else float(score),
                    rgb=rgb,
                )
            )
    return pictures
