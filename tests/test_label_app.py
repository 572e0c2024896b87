"""The MONAI Label app over a real server: `segreport label` on 127.0.0.1 (a free port), a studies folder
of phantom NIfTI files, the bundles trained for one epoch through their own configs, called over HTTP
as 3D Slicer and OHIF call it. One server for the module (it takes about 10 s to start)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("monailabel")
requests = pytest.importorskip("requests")
from requests_toolbelt.multipart.decoder import MultipartDecoder  # noqa: E402

from conftest import REPO  # noqa: E402

BUNDLES = {  # name -> one-epoch training overrides (tiny and quick, as in each bundle's own tests)
    "lesion_report_3d": dict(spacing=[6.4, 6.4, 10.0], max_rounds=1, batch_size=2),
    "medsegtext": dict(image_size=32, val_interval=1),
    "tmc": dict(image_size=64),
}


@pytest.fixture(scope="module")
def served(phantom_dir, tmp_path_factory):
    from monai.bundle import run

    from segreport.label.server import running_server

    root = tmp_path_factory.mktemp("label")
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for image in sorted((phantom_dir / "imagesTr").glob("*.nii.gz")):
        shutil.copy(image, studies / image.name)
        label = nib.load(phantom_dir / "labelsTr" / image.name)
        nib.save(nib.Nifti1Image((np.asarray(label.dataobj) > 0).astype(np.uint8), label.affine),
                 studies / "labels" / "final" / image.name)
    bundles = []
    for name, overrides in BUNDLES.items():  # a bundle folder of the real configs, with its trained weights
        bundle = root / "bundles" / name
        shutil.copytree(REPO / "bundles" / name / "configs", bundle / "configs")
        run("training", config_file=[str(bundle / "configs" / "train.yaml")], bundle_root=str(bundle),
            output_dir=str(root / "train" / name), ckpt_dir=str(bundle / "models"), dataset_dir=str(phantom_dir),
            epochs=1, **overrides)
        bundles.append(bundle)
    app_dir = root / "app"
    with running_server(studies, bundles, app_dir, root / "server.log", cwd=REPO) as url:
        yield {"url": url, "studies": studies, "app": app_dir, "phantom": phantom_dir, "bundles": root / "bundles"}


def _infer(served, model: str, image: str, params: dict | str | None = None, output: str = "all"):
    body = params if isinstance(params, str) else json.dumps(params or {})
    return requests.post(f"{served['url']}/infer/{model}", params={"image": image, "output": output},
                         data={"params": body}, timeout=300)


def _parts(response, tmp_path: Path) -> tuple[nib.Nifti1Image, dict]:
    """The label NIfTI and the result JSON of an ``output=all`` answer."""
    assert response.status_code == 200, response.text[:500]
    image = params = None
    for part in MultipartDecoder.from_response(response).parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        if 'name="params"' in disposition:
            params = json.loads(part.content)
        elif 'name="image"' in disposition:
            path = tmp_path / "label.nii.gz"
            path.write_bytes(part.content)
            image = nib.load(path)
    assert image is not None and params is not None
    return image, params


def _lesion_voxel(served, case: str) -> list[int]:
    """The most interior voxel of the case's largest lesion (IJK of the file, as Slicer sends it)."""
    from segreport.inference.geometry import interior_voxel

    return list(interior_voxel(np.asarray(nib.load(served["phantom"] / "labelsTr" / f"{case}.nii.gz").dataobj) > 0))


def test_info_lists_the_served_tasks(served):
    info = requests.get(f"{served['url']}/info/", timeout=30).json()
    models = info["models"]
    assert set(models) == set(BUNDLES)
    assert models["lesion_report_3d"]["type"] == "deepgrow" and models["medsegtext"]["type"] == "segmentation"
    assert "text" in models["tmc"]["config"] and models["lesion_report_3d"]["labels"] == {"lesion": 1}
    assert set(info["trainers"]) == set(BUNDLES)


def test_slicer_clicks_return_the_mask_on_the_image_grid_and_reuse_the_embedding(served, tmp_path):
    case = "case_0001"
    source = nib.load(served["studies"] / f"{case}.nii.gz")
    fg = _lesion_voxel(served, case)
    label, first = _parts(_infer(served, "lesion_report_3d", case, {"foreground": [fg], "background": []}), tmp_path)
    assert label.shape == source.shape and np.allclose(label.affine, source.affine, atol=1e-4)
    assert first["image_encoded"] and first["points"]["ijk"] == [fg] and first["points"]["labels"] == [1]
    attributes = first["extras"]["attributes"]
    assert set(attributes) == {"shape", "invasion", "density", "heterogeneity", "surface"}
    assert all(abs(sum(a["probs"].values()) - 1) < 1e-3 for a in attributes.values())
    assert {"finding", "lesions", "consistency", "lung", "latency_s"} <= set(first)
    for lesion in first["lesions"]:
        assert {"volume_ml", "centroid_ras_mm", "side", "zone", "attributes"} <= set(lesion)
    # a further click: Slicer sends every click so far; only the new one is decoded, the ROI is not re-encoded
    bg = [fg[0] + 2, fg[1] + 2, fg[2]]
    _, second = _parts(_infer(served, "lesion_report_3d", case, {"foreground": [fg], "background": [bg]}), tmp_path)
    assert not second["image_encoded"] and second["n_encodes"] == first["n_encodes"]
    assert second["points"]["labels"] == [1, 0] and "load_s" in second["latency_s"]
    # reset_state: a new ROI, encoded again
    _, again = _parts(_infer(served, "lesion_report_3d", case, {"foreground": [fg], "reset_state": True}), tmp_path)
    assert again["image_encoded"] and again["points"]["labels"] == [1]


def test_ohif_point_prompts_in_click_order(served, tmp_path):
    case = "case_0002"
    fg = _lesion_voxel(served, case)
    label, first = _parts(_infer(served, "lesion_report_3d", case, {"points": [fg], "point_labels": [1]}), tmp_path)
    assert label.shape == nib.load(served["studies"] / f"{case}.nii.gz").shape and first["image_encoded"]
    far = [fg[0], fg[1] + 3, fg[2]]
    _, second = _parts(_infer(served, "lesion_report_3d", case, {"points": [fg, far], "point_labels": [1, 1]}), tmp_path)
    assert not second["image_encoded"] and second["points"]["labels"] == [1, 1]


def test_the_label_app_and_the_batch_report_a_case_alike(served, tmp_path):
    """Issue 33: one per-case path. The same case and checkpoint give the same report JSON over HTTP and
    from `segreport infer` (provenance, training, warnings included), the response's own fields aside."""
    from segreport.run.batch import run_batch
    from segreport.run.bundles import load_bundle_predictor

    case = "case_0003"
    _, served_report = _parts(_infer(served, "medsegtext", case), tmp_path)
    bundle = served["bundles"] / "medsegtext"
    predictor, _ = load_bundle_predictor(bundle, checkpoint=str(bundle / "models" / "model.pt"))
    summary = run_batch(predictor, served["studies"] / f"{case}.nii.gz", tmp_path / "out", progress=False)
    assert summary.counts["ok"] == 1, summary.cases
    batch_report = json.loads((tmp_path / "out" / f"{case}_report.json").read_text())
    response_only = {"created", "latency_s", "checkpoint", "label_names"}
    assert {"provenance", "model_training", "warnings", "laterality"} <= set(served_report)
    assert ({k: v for k, v in served_report.items() if k not in response_only}
            == {k: v for k, v in batch_report.items() if k not in response_only})


def test_medsegtext_returns_its_finding(served, tmp_path):
    source = nib.load(served["studies"] / "case_0003.nii.gz")
    label, result = _parts(_infer(served, "medsegtext", "case_0003"), tmp_path)
    assert label.shape == source.shape and np.allclose(label.affine, source.affine, atol=1e-4)
    assert isinstance(result["finding"], str) and result["finding"]
    assert result["n_lesions"] == len(result["lesions"]) and "consistency" in result


def test_tmc_takes_the_request_text_or_chains_from_medsegtext(served, tmp_path):
    text = "Unilateral pulmonary infection, one infected area, lower left lung."
    _, given = _parts(_infer(served, "tmc", "case_0004", {"text": text}), tmp_path)
    assert given["extras"]["guide_texts"] == [text] and given["extras"]["guide_text_source"] == "request text"
    _, chained = _parts(_infer(served, "tmc", "case_0004"), tmp_path)
    assert chained["extras"]["guide_text_source"].startswith("findings of medsegtext")


@pytest.mark.parametrize("model,image,params,status,words", [
    ("lesion_report_3d", "no_such_case", {"foreground": [[1, 1, 1]]}, 404, "unknown image 'no_such_case'"),
    ("no_such_model", "case_0001", {}, 404, "unknown model 'no_such_model'"),
    ("lesion_report_3d", "case_0005", {"foreground": [[500, 1, 1]], "reset_state": True}, 422, "outside the image"),
    ("lesion_report_3d", "case_0005", {"points": [[40, 40, 10]], "point_labels": [0], "reset_state": True}, 422,
     "first click must be positive"),
    ("lesion_report_3d", "case_0005", {"foreground": "here"}, 422, "foreground must be a list"),
    ("lesion_report_3d", "case_0005", {"points": [[1, 2]], "point_labels": [1]}, 422, "three numbers"),
    ("lesion_report_3d", "case_0005", '{"foreground": [[1, 2, 3]', 400, "not valid JSON"),
    ("tmc", "case_0005", {"text": 42}, 422, "text must be a string"),
])
def test_bad_requests_get_a_4xx_with_the_reason(served, model, image, params, status, words):
    r = _infer(served, model, image, params)
    assert r.status_code == status, r.text[:500]
    assert words in r.json()["detail"]


def test_the_batch_input_checks_apply(served, tmp_path):
    """A volume of the studies that is not a CT in HU (here values 0..1) is refused with the batch's reason, as a 422."""
    bad = served["studies"] / "sub" / "not_ct.nii.gz"
    bad.parent.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((40, 40, 12), dtype=np.float32), np.diag([2.0, 2.0, 5.0, 1.0])), bad)
    r = _infer(served, "medsegtext", str(bad))
    assert r.status_code == 422 and str(bad) in r.json()["detail"] and "CT" in r.json()["detail"]


def test_the_server_serves_only_its_studies(served, tmp_path):
    """A path outside the studies folder is a 404 with the same words whether or not the file exists
    (absolute, with .., or through a symlink into the folder's parent); issue 32, item 2."""
    outside = tmp_path / "outside.nii.gz"
    shutil.copy(next(served["studies"].glob("*.nii.gz")), outside)
    (served["studies"] / "escape").mkdir(exist_ok=True)
    link = served["studies"] / "escape" / "up"
    if not link.exists():
        link.symlink_to(tmp_path, target_is_directory=True)
    details = set()
    for image in (str(outside), str(served["studies"] / ".." / outside.name), str(link / outside.name),
                  str(tmp_path / "missing.nii.gz"), "/etc/shadow"):
        r = _infer(served, "medsegtext", image)
        assert r.status_code == 404, (image, r.text[:300])
        details.add(r.json()["detail"].replace(repr(image), "IMAGE"))
    assert len(details) == 1  # nothing tells an existing file from a missing one


def test_many_clicks_or_a_long_text_are_refused_at_once(served):
    """20,000 clicks once held the whole server; now a 422 before any is read (issue 32, item 3)."""
    import time

    t = time.perf_counter()
    r = _infer(served, "lesion_report_3d", "case_0005", {"foreground": [[40, 40, 10]] * 20000, "reset_state": True})
    assert r.status_code == 422 and "20000 clicks" in r.json()["detail"] and time.perf_counter() - t < 30
    r = _infer(served, "tmc", "case_0005", {"text": "lower left lung " * 500})
    assert r.status_code == 422 and "characters" in r.json()["detail"]


def test_training_runs_the_bundle_on_the_studies_labels_and_is_then_served(served, tmp_path):
    r = requests.post(f"{served['url']}/train/lesion_report_3d", params={"run_sync": True}, timeout=900,
                      json={"max_epochs": 1, "config": {"spacing": [6.4, 6.4, 10.0], "max_rounds": 1, "batch_size": 2}})
    assert r.status_code == 200, r.text[:1000]
    stats = json.loads((served["app"] / "train" / "lesion_report_3d" / "last_run.json").read_text())
    # fine-tuned from what was served (the bundle's weights), which stay served unless validation improved
    bundle_weights = served["bundles"] / "lesion_report_3d" / "models" / "model.pt"
    assert stats["started_from"] == str(bundle_weights)
    weights = served["app"] / "model" / "lesion_report_3d" / "model.pt"
    assert weights.is_file() == stats["replaced_served_weights"]
    assert (served["app"] / "train" / "lesion_report_3d" / "data" / "labelsTr").is_dir()
    fg = _lesion_voxel(served, "case_0000")
    _, result = _parts(_infer(served, "lesion_report_3d", "case_0000", {"foreground": [fg]}), tmp_path)
    assert result["checkpoint"] == str(weights if stats["replaced_served_weights"] else bundle_weights)
    r = requests.post(f"{served['url']}/train/lesion_report_3d", params={"run_sync": True}, timeout=60,
                      json={"max_epochs": "many"})
    assert r.status_code == 422 and "max_epochs must be an integer" in r.json()["detail"]


def test_label_command_refuses_a_bundle_without_weights_and_a_missing_studies_folder(tmp_path, capsys):
    from segreport.label.server import main

    bundle = tmp_path / "bundles" / "medsegtext"
    shutil.copytree(REPO / "bundles" / "medsegtext" / "configs", bundle / "configs")
    (tmp_path / "studies").mkdir()
    args = ["--app-dir", str(tmp_path / "app")]
    assert main(["--studies", str(tmp_path / "studies"), "--bundles", str(bundle), *args]) == 2
    err = capsys.readouterr().err
    assert "medsegtext: no trained weights" in err and "monai.bundle run training" in err
    assert main(["--studies", str(tmp_path / "nowhere"), "--bundles", str(bundle), *args]) == 2
    assert "--studies must be an existing folder" in capsys.readouterr().err
    assert main(["--studies", str(tmp_path / "studies"), "--bundles", str(tmp_path), *args]) == 2
    assert "neither a bundle folder" in capsys.readouterr().err


# ---------------------------------------------------------------- MONAI Label's client (issue 36)
def _client(served):
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(served["url"])


def _post(served, selector: str, body: dict | None = None) -> tuple[int, dict]:
    from monailabel.client.client import MONAILabelUtils

    status, response, _, _ = MONAILabelUtils.http_method("POST", served["url"], selector, body)
    return status, json.loads(response or b"{}")


def test_active_learning_strategies_of_the_radiology_sample(served):
    client = _client(served)
    for name in ("zz_unlabelled_b", "zz_unlabelled_a"):
        client.upload_image(str(next((served["phantom"] / "imagesTr").glob("*.nii.gz"))), image_id=name)
    assert set(client.info()["strategies"]) == {"random", "first", "last"}
    assert client.next_sample("first", {})["id"] == "zz_unlabelled_a"
    assert client.next_sample("last", {})["id"] == "zz_unlabelled_b"
    assert client.next_sample("random", {})["id"] in {"zz_unlabelled_a", "zz_unlabelled_b"}


def test_batch_infer_with_the_default_body_then_dice_scoring_against_saved_labels(served):
    """On a CPU server the default body spread the images over zero GPUs (ZeroDivisionError, HTTP 500)."""
    status, result = _post(served, "/batch/infer/medsegtext?run_sync=true")
    assert status == 200, result
    assert {"case_0000", "case_0005"} <= set(result)
    store = served["studies"] / "labels"
    assert (store / "original" / "case_0000.nii.gz").is_file()  # what batch inference saves, for scoring

    # saving those labels made MONAI Label queue the dice scoring as a task: it finishes (it once stayed RUNNING)
    import time

    deadline = time.monotonic() + 180
    while True:
        task = requests.get(f"{served['url']}/scoring/", timeout=30).json()
        if task.get("status") in ("DONE", "ERROR") or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert task.get("status") == "DONE", task

    status, scores = _post(served, "/scoring/dice?run_sync=true")
    assert status == 200, scores
    final = np.asarray(nib.load(store / "final" / "case_0000.nii.gz").dataobj).ravel().astype(float)
    original = np.asarray(nib.load(store / "original" / "case_0000.nii.gz").dataobj).ravel().astype(float)
    expected = 2 * (final * original).sum() / (final.sum() + original.sum())
    assert scores["case_0000"] == pytest.approx(expected)


def test_training_with_too_few_labels_is_refused_when_asked(served, tmp_path):
    """A 422 at request time, not a task that fails later (a second server: two labelled studies)."""
    from monailabel.client.client import MONAILabelClientException

    from segreport.label.server import running_server

    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for case in ("case_0000", "case_0001"):
        shutil.copy(served["studies"] / f"{case}.nii.gz", studies)
        shutil.copy(served["studies"] / "labels" / "final" / f"{case}.nii.gz", studies / "labels" / "final")
    bundle = served["bundles"] / "lesion_report_3d"
    with running_server(studies, [bundle], tmp_path / "app", tmp_path / "server.log", cwd=REPO) as url:
        from monailabel.client import MONAILabelClient

        with pytest.raises(MONAILabelClientException, match="422") as caught:
            MONAILabelClient(url).train_start("lesion_report_3d", {"max_epochs": 1})
        assert "2 labelled NIfTI studies, training needs at least 3" in caught.value.msg
