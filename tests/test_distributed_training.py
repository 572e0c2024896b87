"""Multi-GPU training wiring, checked on CPU with gloo: the device is cuda:LOCAL_RANK, validation scores
are reduced over ranks (rank 0 selects model.pt on the whole validation set, not its shard), and a real
torchrun run of the bundle's multi_gpu_train.yaml trains and writes one checkpoint with its spec."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
TEARDOWN_ABORT = "terminate called without an active exception"


def test_training_device_is_the_local_rank(monkeypatch):
    from segreport.run import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("RANK", "7")  # global rank 7 on a second node of 4 GPUs
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.training_device() == torch.device("cuda:3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.training_device() == torch.device("cpu")


def _score_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from segreport.training.medsegtext import SegTextScore
    from segreport.text.tokenizers import build_word_tokenizer

    tok = build_word_tokenizer(["left lung", "right lung"])
    score = SegTextScore(tok)
    score.reset()
    # rank 0 sees a perfect prediction, rank 1 a wrong one: the reduced Dice is the pooled one
    logits = torch.full((1, 1, 4, 4), 10.0 if rank == 0 else -10.0)
    score.update(({"seg_logits": logits}, {"label": torch.ones(1, 1, 4, 4)}))
    queue.put((rank, score.compute()))
    dist.destroy_process_group()


def test_validation_score_is_reduced_over_ranks():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29000 + os.getpid() % 1000
    procs = [ctx.Process(target=_score_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    # pooled Dice over both shards: 2*16 / (16 + 32) = 0.667 on every rank (unreduced: 1.0 and 0.0)
    assert results[0] == pytest.approx(2 * 16 / 48) and results[1] == pytest.approx(results[0])


def _end_training_worker(port: int, queue) -> None:
    import weakref

    from segreport.run.distributed import end_training

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    net(torch.randn(3, 4)).sum().backward()  # a reducer with finished work, as after training
    reducer = weakref.ref(net.reducer)
    end_training(net)
    queue.put((dist.is_initialized(), reducer() is None, net.process_group is None))


def test_end_training_frees_ddps_reducer_and_destroys_the_group():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_end_training_worker, args=(29000 + (os.getpid() + 500) % 1000, queue))
    proc.start()
    initialized, reducer_freed, group_dropped = queue.get(timeout=120)
    proc.join(timeout=60)
    assert not initialized and reducer_freed and group_dropped and proc.exitcode == 0


@pytest.mark.parametrize("bundle, image_size", [("medsegtext", 32), ("tmc", 64), ("lapft", 64)])
def test_torchrun_trains_with_the_multi_gpu_overlay(bundle, image_size, phantom_dir, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this python")
    configs = REPO / "bundles" / bundle / "configs"
    cmd = [str(torchrun), "--standalone", "--nnodes=1", "--nproc_per_node=2", "-m", "monai.bundle", "run", "training",
           "--config_file", str([str(configs / "train.yaml"), str(configs / "multi_gpu_train.yaml")]),
           "--bundle_root", str(REPO / "bundles" / bundle), "--output_dir", str(tmp_path),
           "--ckpt_dir", str(tmp_path / "models"), "--dataset_dir", str(phantom_dir), "--epochs", "1",
           "--val_interval", "1", "--image_size", str(image_size), "--num_threads", "1"]
    # one thread each, and no tokenizers thread pool to be torn down under a forked data loader at exit
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and TEARDOWN_ABORT in run.stderr:
        # PyTorch's gloo teardown at interpreter exit (see segreport.run.distributed.end_training):
        # rare (one rank in a few dozen runs), after training. Once more from scratch; twice is a failure.
        shutil.rmtree(tmp_path / "models", ignore_errors=True)
        run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-1500:] + run.stderr[-3000:]
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert state["spec"]["kind"] == bundle and not any(k.startswith("module.") for k in state["model"])
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["model.pt", "model_final.pt"]
