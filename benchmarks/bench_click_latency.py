"""Latency of one more click: cached image embedding (``decode`` only) vs a full ``forward``, same run.

An interactive session encodes the ROI once and reruns only the prompt side per click; this measures
what that split buys. Both paths run the full model (point refinement + synergy on), one ROI, two
clicks and the previous mask as prompts, on CPU, best of N after warm-up. The two paths are timed
alternately so that load from other processes hits both alike.

The saving is the image encoder, so the ratio grows with the encoder. ``bundle`` is the 3D bundle's
default model exactly as ``train.yaml`` builds it (32³ ROI, residual U-Net backbone, lesion-pooled
attributes with their measured descriptors: what a click costs in the bundle); ``bundle_vit`` is the
same bundle with ``variant_vit.yaml`` (the paper's ViT); ``bundle_paper`` the bundle's default with
``train_paper.yaml`` (128³ ROI, nnInteractive's ResEnc-L widths). ``moderate`` is a small 64³ ViT (4 blocks, 192
wide); ``paper`` is the 128³ SAM-Med3D ViT-B sized configuration (the paper's plain ViT).

    python benchmarks/bench_click_latency.py                          # bundle, bundle_vit, moderate
    python benchmarks/bench_click_latency.py --configs bundle paper   # any subset
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import BUNDLES
from segreport.networks.lesion_prompt import CONFIGS as MODEL_CONFIGS
from segreport.networks.lesion_prompt import LesionPromptNet

BENCH_CONFIGS = {
    # 64³ ROI, 8³ token grid, 4 ViT blocks (2 global), 96-wide prompt side (half the encoder width, as paper)
    "moderate": dict(
        img_size=64, patch_size=8, encoder_embed_dim=192, encoder_depth=4, encoder_num_heads=6, window_size=4,
        global_attn_indexes=(1, 3), embed_dim=96, mask_in_chans=16, token_depth=2, num_heads=4, mlp_dim=384,
        mask_head_depth=1, iou_head_hidden=64,
    ),
    "paper": MODEL_CONFIGS["paper"],
}
TARGET_RATIO = 5.0
BUNDLE = BUNDLES / "lesion_report_3d" / "configs"
BUNDLE_OVERLAYS = {"bundle": [], "bundle_vit": ["variant_vit.yaml"], "bundle_paper": ["train_paper.yaml"]}
SLOW = ("paper", "bundle_paper")  # seconds per pass on a CPU: at most 3 repeats


def bundle_network(overlays: list[str]) -> torch.nn.Module:
    """The 3D bundle's network as its train.yaml (+ overlays) builds it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / f) for f in ("train.yaml", *overlays)])
    return parser.get_parsed_content("network_def")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, warmup: int, repeats: int) -> dict:
    """Best/median seconds of a full forward and of a cached-embedding click for one configuration."""
    torch.manual_seed(0)
    if name in BUNDLE_OVERLAYS:
        model = bundle_network(BUNDLE_OVERLAYS[name]).eval()
        config = dict(model.spec)
    else:
        model = LesionPromptNet(**BENCH_CONFIGS[name], point_refinement=True, synergy=True).eval()
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in BENCH_CONFIGS[name].items()}
    image = torch.randn(1, 1, *model.img_size)
    centre = torch.tensor(model.img_size, dtype=torch.float) / 2
    clicks = torch.stack([centre, centre * torch.tensor([1.3, 0.6, 1.1])]).unsqueeze(0)
    labels = torch.tensor([[1, 0]])
    with torch.inference_mode():
        embedding = model.encode_image(image)
        previous = model.decode(embedding, clicks[:, :1], labels[:, :1])["low_res_logits"]

        def full():
            model(image, clicks, labels, previous)

        def click():
            model.decode(embedding, clicks, labels, previous)

        for _ in range(warmup):
            full()
            click()
        pairs = [(_timed(full), _timed(click)) for _ in range(repeats)]
    full_s, click_s = [p[0] for p in pairs], [p[1] for p in pairs]
    return {
        "config": config,
        "warmup": warmup,
        "repeats": repeats,
        "full_forward_s": {"best": min(full_s), "median": statistics.median(full_s)},
        "cached_click_s": {"best": min(click_s), "median": statistics.median(click_s)},
        "speedup_best": min(full_s) / min(click_s),
        "speedup_median": statistics.median(full_s) / statistics.median(click_s),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=sorted({*BUNDLE_OVERLAYS, *BENCH_CONFIGS}), default=["bundle", "bundle_vit", "moderate"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)  # 1: stable on a shared CPU
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "click_latency.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    result = {
        "benchmark": "click_latency",
        "command": "python benchmarks/bench_click_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "clicks": 2,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "target_speedup": TARGET_RATIO,
        "results": {},
    }
    for key in args.configs:
        repeats = args.repeats if key not in SLOW else min(args.repeats, 3)
        res = result["results"][key] = measure(key, min(args.warmup, repeats), repeats)
        print(
            f"[{key}] full forward {res['full_forward_s']['best'] * 1e3:.1f} ms | cached-embedding click "
            f"{res['cached_click_s']['best'] * 1e3:.1f} ms (best of {repeats}) | speedup "
            f"{res['speedup_best']:.1f}x best, {res['speedup_median']:.1f}x median "
            f"(target >= {TARGET_RATIO:.0f}x: {'met' if res['speedup_best'] >= TARGET_RATIO else 'NOT met'})",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, suffix=".tmp", delete=False) as tmp:
        json.dump(result, tmp, indent=2)
    os.replace(tmp.name, args.out)  # atomic: a reader never sees a half-written file

    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
