"""The DICOM Segmentation: the attention map on the source CT's own grid (highdicom).

One FRACTIONAL segment of type PROBABILITY: for every analysed slice, the stage-1 CAM of its slab
passed through the logistic function cell by cell and resampled bilinearly onto the source pixels
(``cams_on_pixels``, as the SC overlay draws it), so a pixel holds the model's local probability of
embolus, stored in 8 bits (``MaxFractionalValue`` 255, a step of 1/255). Values under ``floor`` are
written as 0, and frames with nothing left are omitted: the SEG holds only the slices where attention
is above the floor, each frame referencing its source image (and its frame, for an Enhanced CT
source). A study with no attention above the floor gets no SEG (an empty list): there is nothing to show.

Optionally (``binary_threshold``) a second instance in the same series: a BINARY segment of the pixels
at or above that probability. highdicom writes one segmentation type per instance, so the two cannot
share one.

UIDs follow the result (``node.outputs.uids``): the same study, model and instances give the same SEG.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from node.inference import NOTICE, StudyResult, sigmoid
from node.outputs import OutputError, for_outputs, names_unquoted
from node.outputs.sc import cams_on_pixels
from node.outputs.uids import output_uid, result_key
from node.preprocess import PreprocessSpec
from node.series import SeriesIndex

log = logging.getLogger(__name__)

SERIES_NUMBER = 9903
#: Segmented property (CID 7150 / 7151): category "Morphologically Abnormal Structure", type "Embolus",
#: anatomic region "Pulmonary artery"; algorithm family "Artificial Intelligence" (CID 7162).
CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
EMBOLUS = codes.SCT.Embolus
PULMONARY_ARTERY = codes.SCT.PulmonaryArtery
ARTIFICIAL_INTELLIGENCE = codes.DCM.ArtificialIntelligence


def attention_probability(result: StudyResult, i: int, shape: tuple[int, int], pixel_mm: tuple[float, float],
                          spec: PreprocessSpec, cam_stride: int) -> np.ndarray:
    """Slice ``i``'s attention as a local probability on the source grid (0 outside the model's field)."""
    return attention_probabilities(result.cams[i:i + 1], shape, pixel_mm, spec, cam_stride)[0]


def attention_probabilities(cams: np.ndarray, shape: tuple[int, int], pixel_mm: tuple[float, float],
                            spec: PreprocessSpec, cam_stride: int) -> np.ndarray:
    """(n, h, w) CAMs in logits -> (n, rows, columns) local probabilities on the source grid, 0 outside:
    each CAM cell's probability (the logistic of its logit), resampled bilinearly like the SC overlay."""
    p = cams_on_pixels(sigmoid(cams).astype(np.float32), shape, pixel_mm, spec, cam_stride)
    return np.nan_to_num(p, nan=0.0)


def _algorithm(result: StudyResult) -> hd.AlgorithmIdentificationSequence:
    model = result.model
    return hd.AlgorithmIdentificationSequence(
        name=str(model.get("name", "petriage")), family=ARTIFICIAL_INTELLIGENCE,
        version=str(model.get("version", "0")), source="petriage",
        parameters={"map": "stage-1 class activation map, logistic", "threshold": f"{result.threshold:.6f}"})


def _description(result: StudyResult, model_sha256: str, binary: bool) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=1, segment_label="PE attention" + (" (thresholded)" if binary else ""),
        segmented_property_category=CATEGORY, segmented_property_type=EMBOLUS,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=_algorithm(result),
        tracking_uid=output_uid(result.study_instance_uid, model_sha256, "seg-tracking"),
        tracking_id="PE attention map",
        anatomic_regions=[PULMONARY_ARTERY])


def make_seg(result: StudyResult, index: SeriesIndex, headers: Sequence[pydicom.Dataset], *, model_sha256: str,
             spec: PreprocessSpec, cam_stride: int, floor: float = 0.5, binary_threshold: float | None = None,
             manufacturer: str = "petriage") -> list[hd.seg.Segmentation]:
    """The SEG instance(s) of ``result`` on the analysed series ``index``; ``headers``: the header of each
    analysed slice's instance, in the index's order (the same header for every frame of an Enhanced CT).

    For an Enhanced CT source the pixel array is laid out by the instance's frames (highdicom maps each
    to its source frame). Returns an empty list when no pixel of any slice reaches ``floor``, or when
    the series is frames of several Enhanced CT instances (highdicom derives from one).
    """
    if not 0.0 < floor < 1.0:
        raise OutputError(f"the SEG floor must lie between 0 and 1, not {floor}")
    if binary_threshold is not None and not floor <= binary_threshold < 1.0:
        raise OutputError(f"the binary threshold must lie between the floor ({floor}) and 1, not {binary_threshold}")
    n = len(result.cams)
    if not n or len(headers) != n or len(index) != n:
        raise OutputError(f"{len(headers)} headers and {len(index)} slices for {n} analysed slices")
    shape, frames = index.shape, list(index.frame_numbers)
    instances = len(set(index.sop_instance_uids))
    if frames[0] is not None and instances > 1:
        # highdicom derives a SEG from one multi-frame source image; the SR and SC still go out
        log.warning("no SEG: the analysed Enhanced CT series spans %d instances", instances)
        return []
    kept: list[int] = []  # the slices with a pixel at or above the floor, and their maps
    maps: list[np.ndarray] = []
    for lo in range(0, n, 32):  # a batch at a time: 32 slices of 512 x 512 floats stay near 100 MB
        p = attention_probabilities(result.cams[lo:lo + 32], shape, index.pixel_spacing_mm, spec, cam_stride)
        p = np.where(p >= floor, p, 0.0).astype(np.float32)
        for j in np.flatnonzero(p.reshape(len(p), -1).any(axis=1)):
            kept.append(lo + int(j))
            maps.append(p[j])
    if not kept:
        return []
    uid = result.study_instance_uid
    digest = result_key(uid, model_sha256, result.sop_instance_uids)
    series = output_uid(uid, digest, "seg-series")
    if frames[0] is not None:  # one Enhanced CT instance: the array follows its frames, empty frames are omitted
        pixels = np.zeros((int(headers[0].NumberOfFrames), *shape), np.float32)
        for i, m in zip(kept, maps, strict=True):
            pixels[int(frames[i] or 0) - 1] = m
        sources = [for_outputs(headers[0])]
    else:  # only the slices with a frame: highdicom then checks and encodes no empty ones
        sources, pixels = [for_outputs(headers[i]) for i in kept], np.stack(maps)
    out = [_segmentation(result, sources, pixels, series, output_uid(uid, digest, "seg", 1), 1, manufacturer,
                         hd.seg.SegmentationTypeValues.FRACTIONAL, model_sha256)]
    if binary_threshold is not None and (pixels >= binary_threshold).any():
        out.append(_segmentation(result, sources, (pixels >= binary_threshold).astype(np.uint8), series,
                                 output_uid(uid, digest, "seg", 2), 2, manufacturer,
                                 hd.seg.SegmentationTypeValues.BINARY, model_sha256))
    return out


def _segmentation(result: StudyResult, sources: list[pydicom.Dataset], pixels: np.ndarray, series: str, sop: str,
                  number: int, manufacturer: str, kind: hd.seg.SegmentationTypeValues,
                  model_sha256: str) -> hd.seg.Segmentation:
    model = result.model
    binary = kind == hd.seg.SegmentationTypeValues.BINARY
    with names_unquoted():
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=pixels, segmentation_type=kind,
            segment_descriptions=[_description(result, model_sha256, binary)],
            series_instance_uid=series, series_number=SERIES_NUMBER, sop_instance_uid=sop, instance_number=number,
            manufacturer=manufacturer, manufacturer_model_name=f"{model.get('name')}"[:64],
            software_versions=str(model.get("version", "0")), device_serial_number="0",
            fractional_type=None if binary else hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
            content_label="PE_ATTENTION", content_description=f"PE attention map - {NOTICE}"[:64],
            omit_empty_frames=True,
            # RLE Lossless (pydicom encodes it natively): mostly-zero 8-bit frames shrink several-fold;
            # highdicom packs a BINARY segment to 1 bit per pixel, which RLE cannot carry.
            transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian if binary else pydicom.uid.RLELossless)
    seg.SeriesDescription = f"PE triage attention SEG - {NOTICE}"
    return seg
