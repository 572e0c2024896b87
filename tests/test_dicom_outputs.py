"""DICOM results (issue 36): for a real DICOM CT series, ``--output-type both`` writes a DICOM SEG whose
frames are the NIfTI lesion map's slices voxel for voxel, and a TID 1500 SR whose measurements are the
JSON report's; a NIfTI input asking for DICOM is refused before the model loads."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_batch import ThresholdPredictor  # noqa: E402  (the batch tests' model: dense lung voxels, density attributes)

from segreport.run.batch import run_batch  # noqa: E402
from segreport.run.outputs import CannotStartError  # noqa: E402


@pytest.fixture(scope="module")
def dicom_series(shared_data, tmp_path_factory) -> Path:
    """A real chest-CT slice (LIDC, both lungs with vessels) stacked into a 12-slice series 1 mm apart, with
    the study, series and frame-of-reference UIDs a PACS series has (the anonymised file has them blank),
    stored in shuffled file order (the SEG must follow positions, not names)."""
    from pydicom.uid import generate_uid

    out = tmp_path_factory.mktemp("dicom") / "series1"
    out.mkdir()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    order = np.random.default_rng(0).permutation(12)
    for k in range(12):
        ds = pydicom.dcmread(shared_data / "lungmask_lidc_slices" / "0.dcm")
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [0.0, 0.0, float(k)]
        ds.InstanceNumber, ds.Modality = k + 1, "CT"  # type 1, missing from the anonymised file
        ds.save_as(out / f"slice_{order[k]:02d}.dcm")
    return out


@pytest.fixture(scope="module")
def dicom_run(dicom_series, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out")
    summary = run_batch(ThresholdPredictor(), dicom_series.parent, out, progress=False, output_type="both")
    assert summary.counts["ok"] == 1, summary.cases
    return out


def test_seg_frames_are_the_lesion_map_voxel_for_voxel(dicom_series, dicom_run):
    import highdicom as hd

    lesions = np.asarray(nib.load(dicom_run / "series1_lesions.nii.gz").dataobj)
    report = json.loads((dicom_run / "series1_report.json").read_text())
    assert report["n_lesions"] >= 2 and lesions.max() == report["n_lesions"]
    seg = hd.seg.segread(dicom_run / "series1_seg.dcm")
    assert seg.SeriesInstanceUID != pydicom.dcmread(next(dicom_series.iterdir())).SeriesInstanceUID
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == list(range(1, report["n_lesions"] + 1))
    # the series is axial LPS: the lesion map (RAS affine of the LPS data) holds slice k as [column, row, k];
    # each source image's slice index is found from its own position, not from the order of anything
    sources = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: pydicom.dcmread(f, stop_before_pixels=True)
               for f in dicom_series.iterdir()}
    inverse = np.linalg.inv(nib.load(dicom_run / "series1_lesions.nii.gz").affine)
    rebuilt = np.zeros_like(lesions)
    for i, frame in enumerate(seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[None]):
        item = seg.PerFrameFunctionalGroupsSequence[i]
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        x, y, z = (float(v) for v in sources[uid].ImagePositionPatient)
        k = int(round((inverse @ [-x, -y, z, 1.0])[2]))
        rebuilt[:, :, k][frame.T > 0] = number
    np.testing.assert_array_equal(rebuilt, lesions)


def test_sr_measurements_are_the_json_reports(dicom_series, dicom_run):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    report = json.loads((dicom_run / "series1_report.json").read_text())
    sr = hd.sr.srread(dicom_run / "series1_sr.dcm")
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    content = hd.sr.MeasurementReport.from_sequence([sr])
    groups = content.get_volumetric_roi_measurement_groups()
    by_id = {g.tracking_identifier: g for g in groups}
    assert report["lesions"] and not report["lesions_outside_lungs"]  # the fixture gives pulmonary lesions
    assert sorted(by_id) == [f"lesion {les['id']}" for les in report["lesions"]]
    for les in report["lesions"]:
        group = by_id[f"lesion {les['id']}"]
        volume = group.get_measurements(name=codes.SCT.Volume)[0]
        assert volume.value == pytest.approx(les["volume_ml"]) and volume.unit.value == "mL"
        centroid = [m.value for axis in "XYZ" for m in group.get_measurements()
                    if m.name.value == f"CENTROID_{axis}"]
        x, y, z = les["centroid_ras_mm"]
        assert centroid == pytest.approx([-x, -y, z])  # DICOM patient coordinates are LPS
        assert list(group.referenced_segment.referenced_segment_numbers) == [les["id"]]
        site = group.finding_sites[0]
        assert site.laterality == {"right": codes.SCT.Right, "left": codes.SCT.Left}[les["side"]]
        evaluations = {e.name.meaning: e.value.meaning for e in group.get_qualitative_evaluations()}
        assert evaluations["Lung zone"] == les["zone"]
        assert evaluations["density"] == les["attributes"]["density"]["label"]
    texts = [item for item in sr.ContentSequence if item.get("ValueType") == "CONTAINER"
             and item.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"]
    assert texts[0].ContentSequence[0].TextValue == report["finding"]


def test_a_nifti_input_asking_for_dicom_is_refused_before_the_model_loads(shared_data, tmp_path):
    ct = shared_data / "totalsegmentator" / "pulmonary_report" / "ct_cropped.nii.gz"
    shutil.copy(ct, tmp_path / "ct.nii.gz")
    with pytest.raises(CannotStartError, match="ct.nii.gz: --output-type dicom .* NIfTI"):
        run_batch(ThresholdPredictor(), tmp_path / "ct.nii.gz", tmp_path / "out", progress=False, output_type="dicom")
    assert not (tmp_path / "out").exists()


def test_an_anonymised_series_without_uids_fails_its_case_by_name(shared_data, tmp_path):
    series = shutil.copytree(shared_data / "totalsegmentator" / "example_ct_dicom", tmp_path / "in" / "anon")
    summary = run_batch(ThresholdPredictor(), tmp_path / "in", tmp_path / "out", progress=False, output_type="dicom")
    assert summary.counts["failed"] == 1
    assert str(series) in summary.cases[0]["error"] and "StudyInstanceUID" in summary.cases[0]["error"]
    assert not list((tmp_path / "out").glob("anon_*"))  # nothing half-written
