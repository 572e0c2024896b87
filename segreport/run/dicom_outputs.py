"""DICOM results for a DICOM input (``segreport infer --output-type dicom|both``), written with highdicom.

- ``<case>_seg.dcm``: a DICOM Segmentation (binary) of the source series, **one segment per lesion**, its
  number the lesion's id in the report and in ``<case>_lesions.nii.gz`` (label "lesion <id>", tracking id
  the same; lesions outside the lungs say so in their label and are typed "Abnormal" rather than
  "Lesion" of the lung). One frame per source image that holds a lesion, referencing it.
- ``<case>_sr.dcm``: a Comprehensive 3D SR, TID 1500 Measurement Report. Per lesion, a volumetric ROI
  group referencing its segment: volume (mL), centroid (x, y, z in DICOM patient coordinates, LPS mm),
  finding site (lung, laterality), zone and each attribute as qualitative evaluations; the case
  finding as a TEXT item under "Qualitative Evaluations".

The frames come from the report's lesion map by geometry: each source image's pixels are mapped through
its own position and orientation (LPS) to the map's voxels (RAS affine), so the result does not depend on
how the series was sorted or stored. Codes not in DICOM/SNOMED (attribute names and values, zones) use the
private coding scheme ``99SEGREPORT``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.io import LPS_TO_RAS, atomic_path
from ..errors import InputError

SCHEME = "99SEGREPORT"
_MILLILITER = ("mL", "UCUM", "milliliter")  # not in pydicom's UCUM dictionary
# patient and study attributes the SEG and SR copy from their source (type 2: may be empty, must be there)
_TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "ReferringPhysicianName", "StudyID", "AccessionNumber")


def read_source_series(folder: str | os.PathLike, series_uid: str | None) -> list:
    """The series' datasets (headers only), in the order GDCM sorts them for reading."""
    import pydicom
    import SimpleITK as sitk

    from ..data.dicom_groups import uid_series

    found = dict(uid_series(Path(folder), sitk.ImageSeriesReader()))
    files = found.get(series_uid or "") or (next(iter(found.values())) if len(found) == 1 else None)
    if not files:
        raise InputError(folder, f"DICOM series {series_uid!r} not found again when writing its DICOM outputs")
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    for ds in datasets:  # the file meta holds the same two UIDs; some anonymisers blank them in the dataset only
        ds.SOPClassUID = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID", "")
        ds.SOPInstanceUID = ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID", "")
        for keyword in _TYPE2_PATIENT_STUDY:  # type 2 (present, may be empty): anonymisers drop some
            if keyword not in ds:
                setattr(ds, keyword, "")
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
               if not all(ds.get(k) for ds in datasets)]
    if missing:
        raise InputError(folder, f"the series lacks {', '.join(missing)} (anonymised?): a DICOM SEG and SR must reference "
                                 f"the source study, series and images by them; use --output-type nifti")
    return datasets


def frames_from_map(label_map: np.ndarray, affine: np.ndarray, datasets: Sequence) -> np.ndarray:
    """(n images, rows, columns) of ``label_map`` sampled at every pixel of every source image."""
    from ..inference.geometry import map_points

    out = []
    for ds in datasets:
        rows, cols = int(ds.Rows), int(ds.Columns)
        row_dir, col_dir = np.split(np.asarray(ds.ImageOrientationPatient, dtype=np.float64), 2)
        dr, dc = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
        # pixel (r, c) lies at origin + r*dr*column_direction + c*dc*row_direction (LPS, mm)
        pixel_to_lps = np.eye(4)
        pixel_to_lps[:3, :3] = np.stack([col_dir * dr, row_dir * dc, np.cross(row_dir, col_dir)], 1)
        pixel_to_lps[:3, 3] = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        pixels = np.stack([r.ravel(), c.ravel(), np.zeros(r.size)], 1)
        idx = np.rint(map_points(pixels, LPS_TO_RAS @ pixel_to_lps, affine)).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < np.asarray(label_map.shape)), axis=-1)
        frame = np.zeros(rows * cols, dtype=label_map.dtype)
        frame[inside] = label_map[tuple(idx[inside].T)]
        out.append(frame.reshape(rows, cols))
    return np.stack(out)


def _code(value: str, meaning: str | None = None):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value[:16], scheme_designator=SCHEME, meaning=(meaning or value)[:64])


def _lesions(report: dict) -> list[tuple[dict, bool]]:
    """(lesion, in the lungs) for every lesion of the report, by id."""
    return sorted([(les, True) for les in report.get("lesions", [])] +
                  [(les, False) for les in report.get("lesions_outside_lungs", [])], key=lambda x: x[0]["id"])


def _equipment(model: str) -> dict:
    from .. import __version__

    return {"manufacturer": "segreport", "manufacturer_model_name": model, "software_versions": __version__,
            "device_serial_number": "0"}


def write_seg(path: str | os.PathLike, datasets: Sequence, frames: np.ndarray, report: dict, model: str):
    """The DICOM SEG (module docstring); returns the dataset (the SR references it)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from .. import __version__

    algorithm = hd.AlgorithmIdentificationSequence(name=f"segreport {model}", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    lesions = _lesions(report)
    descriptions = []
    for les, in_lung in lesions or [({"id": 1}, True)]:  # no lesion: one empty segment says so
        label = f"lesion {les['id']}" + ("" if in_lung else " (outside the lungs)")
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=int(les["id"]), segment_label=label if lesions else "lesion (none found)",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion if in_lung else codes.SCT.MorphologicallyAbnormalStructure,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            tracking_uid=hd.UID(), tracking_id=label))
    seg = hd.seg.Segmentation(
        source_images=list(datasets), pixel_array=frames.astype(np.uint16 if frames.max(initial=0) > 255 else np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=9901, sop_instance_uid=hd.UID(), instance_number=1,
        series_description=f"segreport {model} lesions", omit_empty_frames=bool(lesions), **_equipment(model))
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp))
    return seg


def write_sr(path: str | os.PathLike, datasets: Sequence, seg, report: dict, model: str):
    """The TID 1500 measurement report (module docstring)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    series_uid = datasets[0].SeriesInstanceUID
    ml = hd.sr.CodedConcept(*_MILLILITER)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name=f"segreport {model}"))
    groups = []
    for les, in_lung in _lesions(report):
        x, y, z = LPS_TO_RAS[:3, :3] @ np.asarray(les["centroid_ras_mm"], dtype=np.float64)  # RAS -> LPS (its own inverse)
        measurements = [hd.sr.Measurement(name=codes.SCT.Volume, value=float(les["volume_ml"]), unit=ml)]
        measurements += [hd.sr.Measurement(name=_code(f"CENTROID_{axis}", f"Centroid {axis} (patient LPS)"), value=float(v),
                                           unit=codes.UCUM.Millimeter) for axis, v in zip("XYZ", (x, y, z))]
        evaluations = [hd.sr.QualitativeEvaluation(_code("ZONE", "Lung zone"), _code(les["zone"]))] if les.get("zone") else []
        evaluations += [hd.sr.QualitativeEvaluation(_code(group.upper(), group), _code(a["label"].upper(), a["label"]))
                        for group, a in (les.get("attributes") or {}).items()]
        side = {"right": codes.SCT.Right, "left": codes.SCT.Left}.get(les.get("side"))
        site = hd.sr.FindingSite(anatomic_location=codes.SCT.Lung if in_lung else codes.SCT.Thorax, laterality=side)
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"lesion {les['id']}"),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=int(les["id"]),
                source_series=hd.sr.SourceSeriesForSegmentation(series_uid)),
            finding_type=codes.SCT.Lesion if in_lung else codes.SCT.MorphologicallyAbnormalStructure,
            finding_sites=[site], measurements=measurements, qualitative_evaluations=evaluations or None))
    content = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=observer),
                                      procedure_reported=codes.LN.CTUnspecifiedBodyRegion, imaging_measurements=groups)
    finding = hd.sr.ContainerContentItem(name=hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations"),
                                         relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    finding.ContentSequence = [hd.sr.TextContentItem(name=codes.DCM.Finding, value=report["finding"][:1024],
                                                     relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)]
    content[0].ContentSequence.append(finding)
    sr = hd.sr.Comprehensive3DSR(evidence=[*datasets, seg], content=content[0], series_instance_uid=hd.UID(),
                                 series_number=9902, sop_instance_uid=hd.UID(), instance_number=1,
                                 series_description=f"segreport {model} report", manufacturer="segreport")
    with atomic_path(path) as tmp:
        sr.save_as(str(tmp))
    return sr


def write_dicom_outputs(series_folder: str | os.PathLike, series_uid: str | None, instances: np.ndarray,
                        affine: np.ndarray, report: dict, model: str, paths: dict) -> None:
    """A case's ``dicom_seg`` and ``dicom_sr`` (``paths``) from its lesion map and report."""
    source = read_source_series(series_folder, series_uid)
    seg = write_seg(paths["dicom_seg"], source, frames_from_map(instances, affine, source), report, model)
    write_sr(paths["dicom_sr"], source, seg, report, model)

