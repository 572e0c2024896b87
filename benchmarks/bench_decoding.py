"""Text decoding speed: KV-cached incremental decoding vs re-running the whole prefix each step,
and the cost of one joint MedSegText training step vs a seg-only plus a text-only model.

    python benchmarks/bench_decoding.py                       # paper decoder, tiny joint models
    python benchmarks/bench_decoding.py --joint-config paper  # joint timing at the paper's size

Both numbers are ratios of runs in this one process (warm-up, then best of N with perf_counter),
so they compare like with like on whatever machine runs them. Results: benchmarks/results/decoding.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import common  # noqa: F401  (this checkout's segreport first)
from segreport.losses import JointLoss
from segreport.networks import MedSegText
from segreport.networks.blocks import TransformerTextDecoder

RESULTS = Path(__file__).resolve().parent / "results" / "decoding.json"
PAD, BOS, EOS = 0, 1, 2


def best_times(fns: dict, repeats: int) -> tuple[dict[str, float], dict]:
    """Warm each function up once, then run them in turn ``repeats`` times and keep each one's
    best wall time. Interleaving makes the contenders share whatever other load the machine has."""
    results = {name: fn() for name, fn in fns.items()}
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


def bench_decoding(batch: int, new_tokens: int, vocab: int, repeats: int) -> dict:
    """Paper-size text decoder (768/8/6, FFN 2048) over a 7×7×768 f4 memory, greedy, no early EOS."""
    torch.manual_seed(0)
    decoder = TransformerTextDecoder(
        vocab, memory_channels=768, pad_id=PAD, bos_id=BOS, eos_id=EOS, max_length=new_tokens + 1
    ).eval()
    with torch.no_grad():
        decoder.out.bias[EOS] = -1e4  # force all new_tokens steps: EOS is never the argmax
        memory = decoder.encode_memory(torch.randn(batch, 768, 7, 7))
    times, ids = best_times(
        {"cached": lambda: decoder.generate(memory, use_cache=True),
         "full": lambda: decoder.generate(memory, use_cache=False)},
        repeats,
    )
    t_cached, t_full, cached, full = times["cached"], times["full"], ids["cached"], ids["full"]
    if not torch.equal(cached, full):
        raise AssertionError("incremental and full-recompute greedy decoding returned different tokens")
    assert cached.shape == (batch, new_tokens), cached.shape
    return dict(
        batch=batch, new_tokens=new_tokens, vocab_size=vocab, d_model=768, nhead=8, num_layers=6,
        memory="7x7x768", cached_s=t_cached, full_recompute_s=t_full, speedup=t_full / t_cached,
        same_tokens=True,
    )


def bench_joint(config: str, batch: int, size: int, vocab: int, repeats: int) -> dict:
    """Forward + backward of the loss for one batch: joint model vs seg-only + text-only models."""
    torch.manual_seed(0)
    image = torch.randn(batch, 1, size, size)
    mask = (torch.rand(batch, 1, size, size) > 0.8).float()
    tokens = torch.randint(3, vocab, (batch, 50))
    tokens[:, 0] = BOS
    loss = JointLoss(pad_id=PAD)

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            loss(model(image, tokens[:, :-1]), mask, tokens[:, 1:])["total"].backward()
        return run

    models = {
        mode: MedSegText.from_config(config, vocab_size=vocab, pad_id=PAD, bos_id=BOS, eos_id=EOS, mode=mode).train()
        for mode in ("joint", "segmentation", "text")
    }
    times, _ = best_times({mode: step(model) for mode, model in models.items()}, repeats)
    separate = times["segmentation"] + times["text"]
    return dict(
        config=config, batch=batch, image_size=size, vocab_size=vocab, joint_s=times["joint"],
        seg_only_s=times["segmentation"], text_only_s=times["text"], separate_s=separate,
        joint_over_separate=times["joint"] / separate,
    )


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=50, help="tokens generated after BOS")
    p.add_argument("--vocab", type=int, nargs="+", default=[30524, 64],
                   help="vocabulary sizes: 30524 = the paper's CXR-BERT vocab + [SOS]/[EOS]/[PAD]; 64 ~ a word vocab "
                        "of the finding grammar (the vocab projection costs the same with or without the cache)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is the least noisy on a shared CPU)")
    p.add_argument("--joint-config", choices=["tiny", "paper"], default="tiny")
    p.add_argument("--joint-batch", type=int, default=4)
    p.add_argument("--joint-size", type=int, default=None, help="image side (default: 64 tiny, 224 paper)")
    p.add_argument("--joint-vocab", type=int, default=None, help="default: 64 tiny, 30524 paper")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    decoding = []
    for vocab in a.vocab:
        r = bench_decoding(a.batch, a.new_tokens, vocab, a.repeats)
        decoding.append(r)
        print(f"greedy decoding, paper decoder, batch {a.batch}, {a.new_tokens} tokens, vocab {vocab}: "
              f"cached {r['cached_s']:.3f}s, full recompute {r['full_recompute_s']:.3f}s "
              f"-> {r['speedup']:.1f}x faster with the KV cache (same tokens)")

    paper = a.joint_config == "paper"
    size = a.joint_size or (224 if paper else 64)
    vocab = a.joint_vocab or (30524 if paper else 64)
    joint = bench_joint(a.joint_config, a.joint_batch, size, vocab, a.repeats)
    print(f"train step (fwd+bwd), {a.joint_config} config, batch {a.joint_batch} at {size}²: joint "
          f"{joint['joint_s']:.3f}s vs seg-only {joint['seg_only_s']:.3f}s + text-only {joint['text_only_s']:.3f}s "
          f"= {joint['separate_s']:.3f}s -> joint/separate {joint['joint_over_separate']:.2f}")

    write_json(a.out, dict(
        command="python benchmarks/bench_decoding.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(a).items() if k != "out" and v is not None),
        torch=torch.__version__, threads=a.threads, cpu=platform.processor() or platform.machine(),
        decoding=decoding, joint_vs_separate=joint,
    ))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
