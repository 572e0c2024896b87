"""The model seam: checkpoint specs, one loader for every bundle, and clear errors for every bad checkpoint."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from segreport.errors import InputError
from segreport.models import load, network_from_checkpoint, read_checkpoint
from segreport.models import lesion_report_3d as m3d
from segreport.models import medsegtext as mmst
from segreport.models.convert import convert
from segreport.networks import MedSegText
from segreport.text.tokenizers import build_word_tokenizer

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
TEXTS = ["Unilateral pulmonary infection, one infected area, lower left lung.", "No pulmonary infection."]


def _medsegtext_checkpoint(path, image_size=48):
    tok = build_word_tokenizer(TEXTS)
    net = MedSegText.from_config("tiny", vocab_size=len(tok), pad_id=tok.pad_token_id, bos_id=tok.bos_token_id,
                                 eos_id=tok.eos_token_id, max_length=20)
    torch.save({"model": net.state_dict(), "spec": mmst.spec_for(net, tok, image_size, 20)}, path)
    return net, tok


def test_medsegtext_checkpoint_rebuilds_the_same_model_and_tokenizer(tmp_path):
    net, tok = _medsegtext_checkpoint(tmp_path / "m.pt")
    loaded, spec = network_from_checkpoint(tmp_path / "m.pt")
    x = torch.rand(2, 1, 48, 48)
    net.eval(), loaded.eval()
    assert torch.equal(net.predict(x, max_length=5)["seg_logits"], loaded.predict(x, max_length=5)["seg_logits"])
    predictor = load(tmp_path / "m.pt", batch_size=3)
    assert predictor.image_size == 48 and predictor.batch_size == 3 and predictor.window == "lung"
    _, tok2 = mmst.trained(spec, read_checkpoint(tmp_path / "m.pt")[1])
    assert tok2(TEXTS[0])["input_ids"] == tok(TEXTS[0])["input_ids"]


def test_3d_checkpoint_loads_as_a_prompt_predictor(tmp_path):
    net = m3d.build_network(roi_size=32)
    torch.save({"model": net.state_dict(), "spec": m3d.spec_for(net, threshold=0.4)}, tmp_path / "m3.pt")
    predictor = load(tmp_path / "m3.pt")
    assert predictor.name == "lesion_report_3d" and predictor.threshold == 0.4
    assert predictor.session().roi_size == (32, 32, 32)


def test_bad_checkpoints_get_a_clear_error_naming_the_file(tmp_path):
    net, _ = _medsegtext_checkpoint(tmp_path / "good.pt")
    cases = {
        "missing.pt": None,
        "random.pt": np.random.default_rng(0).bytes(4096),
        "truncated.pt": (tmp_path / "good.pt").read_bytes()[:2000],
    }
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    with pytest.raises(InputError, match=r"missing\.pt: checkpoint not found"):
        read_checkpoint(tmp_path / "missing.pt")
    for name in ("random.pt", "truncated.pt"):
        with pytest.raises(InputError, match=rf"{name}: not a readable PyTorch checkpoint"):
            read_checkpoint(tmp_path / name)
    # a pickled object (code could run on load) is refused, never executed
    (tmp_path / "pickled.pt").write_bytes(pickle.dumps({"model": object()}))
    with pytest.raises(InputError, match=r"pickled\.pt: .*refused for safety|pickled\.pt: not a readable"):
        read_checkpoint(tmp_path / "pickled.pt")
    # weights without a spec (the layout before specs) say how to convert
    torch.save(net.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(InputError, match=r"bare\.pt: checkpoint has no segreport spec.*segreport\.models\.convert"):
        load(tmp_path / "bare.pt")
    # a spec of a kind this version does not know
    spec = read_checkpoint(tmp_path / "good.pt")[0]
    torch.save({"model": net.state_dict(), "spec": {**spec, "kind": "tmc_v9"}}, tmp_path / "other.pt")
    with pytest.raises(InputError, match=r"other\.pt: checkpoint is for model kind 'tmc_v9'"):
        load(tmp_path / "other.pt")


def test_convert_old_3d_checkpoint_and_refuse_a_double_conversion(tmp_path):
    net = m3d.build_network(roi_size=32)
    torch.save({"model": net.state_dict(), "spec": dict(net.spec)}, tmp_path / "old.pt")  # the layout before specs
    spec = convert(tmp_path / "old.pt", tmp_path / "new.pt")
    assert spec["kind"] == "lesion_report_3d" and load(tmp_path / "new.pt").network.spec == net.spec
    with pytest.raises(InputError, match="already has a segreport spec"):
        convert(tmp_path / "new.pt", tmp_path / "again.pt")


def test_a_bundle_refuses_another_bundles_checkpoint(tmp_path, phantom_dir, capsys):
    from segreport.cli import main

    net = m3d.build_network(roi_size=32)
    torch.save({"model": net.state_dict(), "spec": m3d.spec_for(net)}, tmp_path / "m3.pt")
    code = main(["infer", "--bundle", str(REPO / "bundles" / "medsegtext"), "--checkpoint", str(tmp_path / "m3.pt"),
                 "-i", str(phantom_dir / "imagesTr"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "m3.pt: checkpoint is a 'lesion_report_3d' model, not 'medsegtext'" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_checkpoint_is_data_never_code(tmp_path):
    """A spec naming any callable outside the network registry is refused before anything is imported or
    called (issue 32: `os.system` in `network._target_` used to run); bad values are refused by name."""
    import copy

    good = tmp_path / "good.pt"
    _medsegtext_checkpoint(good)
    state = torch.load(good, weights_only=True)
    marker = tmp_path / "ran"
    attacks = {
        "os.system": ({"_target_": "os.system", "args": {"command": f"touch {marker}"}}, "not a segreport network"),
        "builtins.eval": ({"_target_": "builtins.eval", "args": {"source": f"open('{marker}', 'w')"}}, "not a segreport network"),
        "subprocess.run": ({"_target_": "subprocess.run", "args": {"args": ["touch", str(marker)]}}, "not a segreport network"),
    }
    for name, (network, message) in attacks.items():
        spec = copy.deepcopy(state["spec"])
        spec["network"] = network
        torch.save({"model": state["model"], "spec": spec}, tmp_path / f"{name}.pt")
        with pytest.raises(InputError, match=message) as err:
            load(tmp_path / f"{name}.pt")
        assert str(tmp_path / f"{name}.pt") in str(err.value) and not marker.exists()
    for where, key, value, message in (("preprocessing", "image_size", 100000, "image_size 100000"),
                                       ("preprocessing", "axcodes", "XYZ", "axcodes 'XYZ'"),
                                       ("inference", "threshold", 7.0, "threshold 7.0")):
        spec = copy.deepcopy(state["spec"])
        spec[where][key] = value
        torch.save({"model": state["model"], "spec": spec}, tmp_path / "bad.pt")
        with pytest.raises(InputError, match=message) as err:
            load(tmp_path / "bad.pt")
        assert str(tmp_path / "bad.pt") in str(err.value)
