"""The Secondary Capture series: key slices with the attention map as a colour overlay, plus a summary.

Each key slice is the source CT slice in a PE window (centre 100, width 700 HU) with the stage-1 CAM
of its slab blended on in red-to-yellow where it lies within 3 logits of its peak (nearer the peak,
more opaque), and a green cross at the attention peak; burned-in text gives the probability, the
model and the notice. The last image is a summary: finding, probability, threshold, model name and
version, key slices. Patient and study attributes come from the source (highdicom
``SCImage.from_ref_dataset``); each key image references its source slice in SourceImageSequence
(with ReferencedFrameNumber when the source is a frame of an Enhanced CT instance).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont

from node.inference import NOTICE, StudyResult
from node.outputs import OutputError, for_outputs, names_unquoted
from node.outputs.uids import output_uid, result_key
from node.preprocess import PreprocessSpec, input_to_pixel
from node.series import SourceSlice

SERIES_NUMBER = 9901
WINDOW = (100.0, 700.0)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one size
        return ImageFont.load_default()


def cam_on_pixels(cam: np.ndarray, shape: tuple[int, int], pixel_mm: tuple[float, float], spec: PreprocessSpec,
                  stride: int) -> np.ndarray:
    """The (h, w) CAM resampled bilinearly onto the original (rows, columns) grid; NaN outside the model's field."""
    return cams_on_pixels(cam[None], shape, pixel_mm, spec, stride)[0]


def cams_on_pixels(cams: np.ndarray, shape: tuple[int, int], pixel_mm: tuple[float, float], spec: PreprocessSpec,
                   stride: int) -> np.ndarray:
    """(n, h, w) CAMs of slices of one series resampled bilinearly onto its (rows, columns) grid, all at once;
    NaN outside the model's field. Bilinear sampling is separable: out = Wy @ cam @ Wx.T with one
    interpolation matrix per axis, shared by every slice of the series."""
    _, h, w = cams.shape
    origin = input_to_pixel(np.zeros(2), shape, pixel_mm, spec)  # input_to_pixel is linear per axis
    scale = (input_to_pixel(np.full(2, float(spec.size)), shape, pixel_mm, spec) - origin) / spec.size

    def weights(axis: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
        r = (np.arange(shape[axis]) + 0.5 - origin[axis]) / scale[axis] / stride - 0.5
        lo = np.clip(np.floor(r).astype(int), 0, cells - 1)
        hi, f = np.minimum(lo + 1, cells - 1), np.clip(r - lo, 0, 1)
        m = np.zeros((shape[axis], cells), np.float32)
        np.add.at(m, (np.arange(shape[axis]), lo), 1 - f)
        np.add.at(m, (np.arange(shape[axis]), hi), f)
        return m, (r >= -0.5) & (r <= cells - 0.5)

    wy, in_y = weights(0, h)
    wx, in_x = weights(1, w)
    out = wy @ cams.astype(np.float32) @ wx.T
    return np.where((in_y[:, None] & in_x[None, :])[None], out, np.nan).astype(np.float32)


def _overlay(hu: np.ndarray, cam: np.ndarray, peak: tuple[float, float], lines: list[str]) -> np.ndarray:
    lo = WINDOW[0] - WINDOW[1] / 2
    grey = np.clip((hu - lo) / WINDOW[1], 0, 1) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    valid = np.isfinite(cam)
    if valid.any():
        filled = np.where(valid, cam, np.nanmin(cam))
        # CAM in logit units: show what lies within 3 of the peak (weight >= e^-3 of the peak's in the pooling)
        norm = np.clip((filled - (float(filled[valid].max()) - 3.0)) / 3.0, 0, 1)
        alpha = (0.7 * norm * valid)[..., None]
        colour = np.stack([np.full_like(norm, 255.0), 255.0 * norm, np.zeros_like(norm)], axis=-1)
        rgb = rgb * (1 - alpha) + colour * alpha
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    r, c = float(peak[0]), float(peak[1])
    size = max(4, img.width // 64)
    draw.line([(c - size, r), (c + size, r)], fill=(0, 255, 0), width=2)
    draw.line([(c, r - size), (c, r + size)], fill=(0, 255, 0), width=2)
    font = _font(max(10, img.width // 40))
    for i, line in enumerate(lines):
        draw.text((6, 4 + i * (font.size + 3 if hasattr(font, "size") else 14)), line, fill=(255, 255, 0), font=font)
    return np.asarray(img)


def _summary(shape: tuple[int, int], lines: list[str]) -> np.ndarray:
    img = Image.new("RGB", (shape[1], shape[0]), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    font = _font(max(12, shape[1] // 28))
    step = (font.size if hasattr(font, "size") else 12) + 8
    for i, line in enumerate(lines):
        draw.text((16, 16 + i * step), line, fill=(255, 255, 255) if i else (255, 80, 80), font=font)
    return np.asarray(img)


def make_sc_series(result: StudyResult, sources: Sequence[SourceSlice], *, model_sha256: str,
                   spec: PreprocessSpec, cam_stride: int, manufacturer: str = "petriage") -> list[hd.sc.SCImage]:
    """Key-slice overlays (one per key slice, ``sources`` in the same order) and a summary."""
    if len(sources) != len(result.key_slices) or not sources:
        raise OutputError("one source slice per key slice is needed")
    uid = result.study_instance_uid
    digest = result_key(uid, model_sha256, result.sop_instance_uids)
    series = output_uid(uid, digest, "sc-series")
    model = result.model
    decision = "PE suspected" if result.positive else "PE not suspected"
    head = f"{decision}: p = {result.probability:.3f} (threshold {result.threshold:.3f})"
    tail = f"{model.get('name')} {model.get('version')} - {NOTICE}"
    images = []
    for k, (key, source) in enumerate(zip(result.key_slices, sources, strict=True), 1):
        ds = source.dataset
        if (str(ds.SOPInstanceUID), source.frame_number) != (key.sop_instance_uid, key.frame_number):
            raise OutputError(f"key slice {k}: source {ds.SOPInstanceUID} frame {source.frame_number} is not "
                              f"{key.sop_instance_uid} frame {key.frame_number}")
        cam = cam_on_pixels(result.cams[key.index], source.hu.shape, source.pixel_spacing_mm, spec, cam_stride)
        rgb = _overlay(source.hu, cam, (key.peak_row, key.peak_column),
                       [head, f"key slice {k}: slice p = {key.probability:.3f}", tail])
        images.append(_sc(ds, rgb, series, output_uid(uid, digest, "sc", k), k, manufacturer,
                          f"Key slice {k} with attention overlay - {NOTICE}", frame_number=source.frame_number))
    lines = [decision, f"probability {result.probability:.3f}", f"threshold {result.threshold:.3f} "
             f"({result.operating_point})", f"model {model.get('name')} {model.get('version')}",
             "key slices: " + ", ".join(f"#{k.index} (p {k.probability:.2f})" for k in result.key_slices),
             *(["synthetic training data - not for clinical use"] if model.get("synthetic_training_data") else []),
             NOTICE]
    summary = _summary(sources[0].hu.shape, lines)
    images.append(_sc(sources[0].dataset, summary, series, output_uid(uid, digest, "sc", 0), len(sources) + 1,
                      manufacturer, f"Summary of the PE triage result - {NOTICE}", reference=False))
    return images


def _sc(source: pydicom.Dataset, rgb: np.ndarray, series: str, sop: str, number: int, manufacturer: str,
        description: str, reference: bool = True, frame_number: int | None = None) -> hd.sc.SCImage:
    with names_unquoted():
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=for_outputs(source), pixel_array=np.ascontiguousarray(rgb, dtype=np.uint8),
            photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
            series_instance_uid=series, series_number=SERIES_NUMBER, sop_instance_uid=sop, instance_number=number,
            manufacturer=manufacturer, patient_orientation=("L", "P"),
            transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian)
    image.SeriesDescription = f"PE triage key images - {NOTICE}"
    image.DerivationDescription = description
    image.BurnedInAnnotation = "YES"
    image.Laterality = ""  # type 2C in General Series (dciodvfy asks for it); a chest is unpaired: empty
    if reference:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = source.SOPClassUID
        item.ReferencedSOPInstanceUID = source.SOPInstanceUID
        if frame_number is not None:
            item.ReferencedFrameNumber = frame_number
        image.SourceImageSequence = [item]
    return image
