"""Give an old checkpoint (weights without a segreport spec) its spec.

    python -m segreport.models.convert OLD.pt NEW.pt --config bundles/<name>/configs/train.yaml [--set key=value ...]

The spec is what the training config builds (``model_spec``), so pass the same config, dataset and
overrides the model was trained with (the tokenizer is rebuilt from the same training texts). A 3D
lesion-report checkpoint of the previous layout (``{"model", "spec": build arguments}``) converts
without a config. The weights are checked against the spec's network before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from ..data.io import atomic_path
from ..errors import InputError
from .spec import SPEC_FORMAT, build_network, load_weights


def _old_weights(state) -> tuple[dict, dict | None]:
    """(weights, old 3D build arguments or None) of the layouts earlier versions wrote."""
    if not isinstance(state, Mapping):
        raise InputError(None, f"expected a dict checkpoint, got {type(state).__name__}")
    if isinstance(state.get("spec"), Mapping) and state["spec"].get("format") == SPEC_FORMAT:
        raise InputError(None, "checkpoint already has a segreport spec: nothing to convert")
    weights = state.get("model", state.get("state_dict", state))
    weights = {k: v for k, v in weights.items() if k != "_extra_state"}  # MedSegText's old config carrier
    old_3d = state.get("spec") if isinstance(state.get("spec"), Mapping) and "roi_size" in state["spec"] else None
    return weights, old_3d


def convert(old: str | Path, new: str | Path, config: list[str] | None = None, overrides: Mapping | None = None) -> dict:
    state = torch.load(old, map_location="cpu", weights_only=True)
    weights, old_3d = _old_weights(state)
    if old_3d is not None:
        from .lesion_report_3d import build_network as build_3d, spec_for

        spec = spec_for(build_3d(**old_3d))
    elif config:
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(config)
        for key, value in (overrides or {}).items():
            parser[key] = value
        spec = parser.get_parsed_content("model_spec")
    else:
        raise InputError(old, "this checkpoint needs --config: the training config it was made with")
    load_weights(build_network(spec), weights, old)  # refuse before writing if they do not fit
    with atomic_path(new) as tmp:
        torch.save({"model": weights, "spec": spec}, tmp)
    return spec


def main(argv: list[str] | None = None) -> int:
    import yaml

    p = argparse.ArgumentParser(prog="python -m segreport.models.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--config", nargs="+", help="the training config file(s) the model was trained with")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="the overrides it was trained with")
    a = p.parse_args(argv)
    overrides = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in a.set)}
    try:
        spec = convert(a.old, a.new, a.config, overrides)
    except InputError as exc:
        print(f"convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"{a.new}: {spec['kind']} checkpoint with spec")
    return 0


if __name__ == "__main__":
    sys.exit(main())
