"""Every bundle through MONAI's own bundle tools (issue 35): ``verify_metadata``, ``verify_net_in_out``,
``ckpt_export`` (TorchScript), ``monai.bundle.load`` and ``CheckpointLoader``; the exported model gives the
eager model's mask; the config's MONAI pieces (pre-processing, inferer, network_def, post-processing) give
the predictor's mask on a slice; a bundle copied to another folder trains and infers there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from segreport.models.untrained import write_untrained_checkpoint

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("medsegtext", "lesion_report_3d", "tmc", "lapft")
TEXT = "Unilateral pulmonary infection, one infected area, lower left lung."


@pytest.fixture(scope="module")
def copied_bundles(tmp_path_factory) -> Path:
    """Each bundle copied to a temporary folder with an untrained checkpoint in its ``models/``."""
    root = tmp_path_factory.mktemp("bundles")
    for name in BUNDLES:
        shutil.copytree(REPO / "bundles" / name, root / name, ignore=shutil.ignore_patterns("models", "outputs"))
        write_untrained_checkpoint(name, root / name / "models" / "model.pt")
    return root


def _input_shape(bundle: Path) -> list[int]:
    """The untrained checkpoint's own input size (the metadata gives the paper configuration's)."""
    spec = torch.load(bundle / "models" / "model.pt", weights_only=True)["spec"]
    pre = spec["preprocessing"]
    return [pre["roi_size"]] * 3 if spec["kind"] == "lesion_report_3d" else [pre["image_size"]] * 2


def _tool_args(bundle: Path) -> dict:
    return dict(config_file=str(bundle / "configs" / "inference.json"), meta_file=str(bundle / "configs" / "metadata.json"),
                bundle_root=str(bundle))


@pytest.mark.parametrize("name", BUNDLES)
def test_verify_metadata_against_the_schema(name, shared_data, tmp_path):
    from monai.bundle import verify_metadata

    schema = shared_data / "monai_bundle_schema" / "meta_schema_20240725.json"
    verify_metadata(meta_file=str(REPO / "bundles" / name / "configs" / "metadata.json"), filepath=str(schema))


@pytest.mark.parametrize("name", BUNDLES)
def test_verify_net_in_out_and_ckpt_export_give_the_eager_mask(name, copied_bundles, tmp_path, monkeypatch):
    from monai.bundle import ckpt_export, verify_net_in_out

    bundle = copied_bundles / name
    monkeypatch.chdir(tmp_path)  # from anywhere: nothing is read from the working directory
    shape = _input_shape(bundle)
    meta_shape = {"_meta_#network_data_format#inputs#image#spatial_shape": shape}
    text = {"text": TEXT} if name in ("tmc", "lapft") else {}
    verify_net_in_out(net_id="network_def", device="cpu", **_tool_args(bundle), **meta_shape, **text)

    exported = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(exported), key_in_ckpt="model", use_trace=True,
                input_shape=[1, 1, *shape], **_tool_args(bundle), **text)
    ts = torch.jit.load(str(exported))

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle), **text})
    eager = parser.get_parsed_content("network_def")
    eager.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True)["model"])
    torch.manual_seed(1)
    x = torch.rand(2, 1, *shape)  # not the tracing input: the trace must hold for other images
    with torch.no_grad():
        assert torch.equal(ts(x) > 0, eager.eval()(x) > 0)


@pytest.mark.parametrize("name", BUNDLES)
def test_monai_bundle_load_and_checkpoint_loader_take_the_weights(name, copied_bundles):
    import monai.bundle
    from monai.handlers import CheckpointLoader

    bundle = copied_bundles / name
    weights = torch.load(bundle / "models" / "model.pt", weights_only=True)["model"]
    net = monai.bundle.load(name, bundle_dir=str(copied_bundles), workflow_type="inference", key_in_ckpt="model",
                            device="cpu")
    assert set(net.state_dict()) == set(weights)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in weights.items())

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle), "text": TEXT})
    fresh = parser.get_parsed_content("network_def")
    loader = CheckpointLoader(load_path=str(bundle / "models" / "model.pt"), load_dict={"model": fresh}, map_location="cpu")
    from ignite.engine import Engine

    loader(Engine(lambda engine, batch: None))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in weights.items())


@pytest.mark.parametrize("name", ("medsegtext", "tmc"))
def test_the_configs_monai_pieces_give_the_predictors_mask_on_a_slice(name, copied_bundles):
    """preprocessing -> inferer(network_def) -> postprocessing on one display-oriented slice = the
    predictor's mask for a one-slice volume stored in display orientation."""
    from monai.bundle import ConfigParser

    bundle = copied_bundles / name
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle), "device": "cpu", "text": TEXT})
    size = _input_shape(bundle)[0]
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 200, size=(size, size)).astype(np.float32)
    hu[size // 4: size // 2, size // 4: size // 2] = 0.0  # a dense patch

    net = parser.get_parsed_content("network")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True)["model"])
    x = parser.get_parsed_content("preprocessing")(torch.from_numpy(hu)[None])
    with torch.no_grad():
        mask = parser.get_parsed_content("postprocessing")(parser.get_parsed_content("inferer")(x[None], net.eval())[0])

    predictor = parser.get_parsed_content("predictor")
    # a one-slice volume stored in the display orientation (PLS: rows posterior, columns toward the left)
    display_affine = np.array([[0.0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    prompts = {}
    if name == "tmc":
        ids, ids_mask = predictor.tokenize(TEXT)
        prompts["slice_prompts"] = lambda idx: {"tokens": ids[None].expand(len(idx), -1),
                                                "tokens_mask": ids_mask[None].expand(len(idx), -1)}
    prob, _ = predictor.probabilities(hu[:, :, None], display_affine, **prompts)
    assert np.array_equal(np.asarray(prob)[:, :, 0] > predictor.threshold, np.asarray(mask[0]) > 0.5)


@pytest.mark.parametrize("name", BUNDLES)
def test_a_copied_bundle_trains_and_infers_where_it_lies(name, phantom_dir, tmp_path, monkeypatch):
    """No bundle_root, no path into the repository: the copy's configs find the copy (its ``models/`` and
    ``outputs/``), from an unrelated working directory."""
    from monai.bundle import run

    bundle = tmp_path / "elsewhere" / name
    shutil.copytree(REPO / "bundles" / name, bundle, ignore=shutil.ignore_patterns("models", "outputs"))
    monkeypatch.chdir(tmp_path)
    configs = bundle / "configs"
    run("training", config_file=str(configs / "train.yaml"), dataset_dir=str(phantom_dir), epochs=1, num_threads=1)
    assert (bundle / "models" / "model.pt").is_file()
    tags = _tensorboard_tags(bundle / "outputs" / "logs")
    assert "train_loss" in tags["scalars"] and "learning_rate/group0" in tags["scalars"]
    assert any(t.startswith("loss_parts/") for t in tags["scalars"]), tags
    assert tags["images"] == ["validation/image_reference_prediction"]

    ct = sorted((phantom_dir / "imagesTr").glob("*.nii.gz"))[0]
    text = {"text": TEXT} if name in ("tmc", "lapft") else {}
    run("inferring", config_file=str(configs / "inference.json"), input_image=str(ct), **text)
    assert len(list((bundle / "outputs" / "inference").glob("*_report.json"))) == 1
    manifest = json.loads((bundle / "outputs" / "inference" / "manifest.json").read_text())
    assert manifest["model"]["checkpoint"]["path"] == str(bundle / "models" / "model.pt")


def _tensorboard_tags(log_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = set(), set()
    for events in log_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        images |= set(acc.Tags()["images"])
    return {"scalars": scalars, "images": sorted(images)}


@pytest.mark.parametrize("name", BUNDLES)
def test_bundle_docs_have_model_zoo_sections_and_a_weights_record(name):
    import yaml

    headings = [line[3:].lower() for line in (REPO / "bundles" / name / "docs" / "README.md").read_text().splitlines()
                if line.startswith("## ")]
    for section in ("overview", "data", "training", "performance", "commands", "references", "licence"):
        assert any(h.startswith(section) for h in headings), (name, section, headings)
    record = yaml.safe_load((REPO / "bundles" / name / "large_files.yml").read_text())
    assert [f["path"] for f in record["large_files"]] == ["models/model.pt"]


def test_fine_tuning_keeps_the_starting_weights_unless_validation_beats_them(phantom_dir, tmp_path):
    """``initial_weights``: the starting weights are validated before the first epoch, so ``model.pt`` (saved
    at the best key metric) is them unless an epoch scores higher (what MONAI Label training relies on)."""
    from monai.bundle import run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    configs = REPO / "bundles" / "tmc" / "configs"
    common = dict(config_file=str(configs / "train.yaml"), bundle_root=str(REPO / "bundles" / "tmc"),
                  dataset_dir=str(phantom_dir), num_threads=1)
    run("training", output_dir=str(tmp_path / "a"), ckpt_dir=str(tmp_path / "a" / "models"), epochs=1, **common)
    start = tmp_path / "a" / "models" / "model.pt"
    run("training", output_dir=str(tmp_path / "b"), ckpt_dir=str(tmp_path / "b" / "models"), epochs=2, val_interval=1,
        initial_weights=str(start), **common)
    scores = []
    for events in (tmp_path / "b" / "logs").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "val_dice" in acc.Tags()["scalars"]:
            scores += [(e.step, e.value) for e in acc.Scalars("val_dice")]
    scores = [v for _, v in sorted(scores)]
    assert len(scores) == 3  # the starting weights, then each epoch
    a, b = (torch.load(p, weights_only=True)["model"] for p in (start, tmp_path / "b" / "models" / "model.pt"))
    same = all(torch.equal(a[k], b[k]) for k in a)
    assert same == (max(scores[1:]) <= scores[0]), scores
