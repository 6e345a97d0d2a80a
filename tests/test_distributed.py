"""Training on several processes (torchrun, DDP with gloo on the CPU): the batch split across
ranks, the collectives prn uses, and real `torchrun -m prn fit` runs.

Why the 2-process weights are compared with a one-process run that normalises each rank's share
on its own, and not with plain one-process training: the head has BatchNorm layers, and on the
CPU each rank normalises its share of the batch with that share's statistics (PyTorch's
SyncBatchNorm, which shares them and which prn uses on CUDA, has no CPU kernels). With one
thread per process the two are then equal to float rounding (observed: bit for bit); plain
one-process training differs by far more, which the test also checks, so the tolerance is not
what makes it pass.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prn.anomalies.compose import AnomalyGenerator, BalancedBatchSampler, TrainingSet, is_gray
from prn.checkpoint import load_checkpoint
from prn.config import PRNConfig
from prn.data.split import Split
from prn import distributed
from prn.distributed import World, world
from prn.errors import UsageError
from prn.model.loss import prn_loss
from prn import registry
from prn.data.datasets import load_training_arrays
from prn.preprocess import batches_of
from prn.runtime import seed_everything
from prn.train import lr_at, make_optimizer, train

TOLERANCE = 1e-6  # max |w_ddp - w_one_process| over the head's parameters; they move by ~0.5
LAUNCH_TIMEOUT = 150  # seconds any torchrun launch may take before the test fails (not hangs)


def torchrun(*args: str, cwd: Path, timeout: float = LAUNCH_TIMEOUT, env: dict | None = None,
             script: Path | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m prn ARGS`` (or SCRIPT ARGS), one thread per
    process (as torchrun's own default, set here because CI exports OMP_NUM_THREADS=2)."""
    target = [str(script)] if script else ["-m", "prn"]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PRN_DIST_TIMEOUT="60", **(env or {}))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", *target, *args],
                          cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def tiny(tiny_config, demo_root, out, **kw) -> PRNConfig:
    return tiny_config(demo_root, out, **{"epochs": 2, "lr": 1e-3, **kw})


# ---------------------------------------------------------------- the batch split across ranks

def test_each_rank_takes_every_nth_slot_so_the_shares_make_the_one_process_batch():
    cfg = PRNConfig(batch_size=16, seen_fraction=0.125)  # slots 8 normal, 3 extended, 3 simulated, 2 seen
    whole = list(BalancedBatchSampler(10, cfg, seed=4, epoch=1, steps=3))
    shares = [list(BalancedBatchSampler(10, cfg, seed=4, epoch=1, steps=3, rank=r, world_size=2))
              for r in range(2)]
    for b, batch in enumerate(whole):
        assert shares[0][b] == batch[0::2] and shares[1][b] == batch[1::2]
        assert len(shares[0][b]) == len(shares[1][b]) == 8
    four = [list(BalancedBatchSampler(10, cfg, seed=4, epoch=1, steps=3, rank=r, world_size=4)) for r in range(4)]
    assert sorted(k for r in range(4) for k in four[r][2]) == sorted(whole[2])


def test_a_batch_that_does_not_split_evenly_over_the_processes_is_refused():
    with pytest.raises(ValueError, match="batch_size 16 does not split evenly over 3 processes"):
        BalancedBatchSampler(10, PRNConfig(batch_size=16), seed=0, epoch=0, rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank < world_size"):
        BalancedBatchSampler(10, PRNConfig(batch_size=16), seed=0, epoch=0, rank=2, world_size=2)


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused_before_any_work(tmp_path, monkeypatch):
    from prn import api
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed, "setup", lambda device: (distributed.world(), device))
    with pytest.raises(UsageError, match="batch_size 16 does not split evenly over 3 processes; use a "
                                         "multiple of 12, e.g. 12"):
        api.fit(PRNConfig(root=str(tmp_path / "absent"), batch_size=16, device="cpu"), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_world_comes_from_torchruns_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert world() == World(0, 1, 0, 1) and not world().distributed
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert world() == World(3, 4, 1, 2) and not world().is_main
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(UsageError, match="RANK=4 and WORLD_SIZE=4"):
        world()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(UsageError, match="RANK='one' is not an integer"):
        world()


# ---------------------------------------------------------------- the collectives, 2 processes

COLLECTIVES = r'''
import sys
import torch
from torch import nn
from prn import distributed
from prn.config import PRNConfig
from prn.data.split import Split
from prn.model.prototypes import Prototypes

w, device = distributed.setup(torch.device("cpu"))
assert w.size == 2 and torch.distributed.get_backend() == "gloo", w

# the run folder, split and config that rank 0 made, as the others receive them
cfg = PRNConfig(category=f"made-by-rank-{w.rank}", image_hw=(64, 96))
split = Split.load(sys.argv[1]) if w.is_main else None
run_dir, got_split, got_cfg = distributed.share_run("runs/x" if w.is_main else None, split, cfg)
assert str(run_dir) == "runs/x" and got_cfg.data.category == "made-by-rank-0" and got_cfg.model.image_hw == (64, 96)
assert got_split.to_dict() == Split.load(sys.argv[1]).to_dict()

# prototypes fitted on rank 0 only, of a K the others do not know
model = nn.Module()
model.prototypes = Prototypes(3)
if w.is_main:
    model.prototypes.set([torch.full((3, 2, 4, 4), float(j + 1)) for j in range(3)])
distributed.share_buffers(model, ("prototypes.",))
assert [tuple(getattr(model.prototypes, n).shape) for n in model.prototypes.names] == [(3, 2, 4, 4)] * 3
assert float(model.prototypes.p3.sum()) == 3 * 3 * 2 * 16

# the mean of per-rank values; batch-norm statistics averaged, the encoder's left alone
assert distributed.mean_over_ranks(torch.tensor([float(w.rank), 10.0])).tolist() == [0.5, 10.0]
head = nn.Module()
head.decoder, head.encoder = nn.BatchNorm2d(2), nn.BatchNorm2d(2)
head.decoder.running_mean.fill_(w.rank * 2.0)
head.encoder.running_mean.fill_(w.rank * 2.0)
distributed.average_buffers(head, ("running_mean", "running_var"))
assert head.decoder.running_mean.tolist() == [1.0, 1.0], head.decoder.running_mean
assert head.encoder.running_mean.tolist() == [w.rank * 2.0] * 2
assert distributed.rank_label() == f" (rank {w.rank} of 2)"
distributed.barrier()
print(f"rank {w.rank} ok")
'''


def test_two_processes_share_the_run_the_prototypes_and_their_means(demo_root, tiny_config, tmp_path):
    from prn import api
    split_path = tmp_path / "split.json"
    api.make_split(tiny_config(demo_root, tmp_path)).save(split_path)
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    done = torchrun(str(split_path), cwd=tmp_path, script=script, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 ok" in done.stdout and "rank 1 ok" in done.stdout


# ---------------------------------------------------------------- torchrun -m prn fit

def per_share_training(cfg: PRNConfig, split: Split, shares: int, epochs: int) -> torch.nn.Module:
    """One process training as ``shares`` ranks do on the CPU: each rank's share of every global
    batch through the network on its own (BatchNorm statistics per share), the gradient the mean
    of the shares' (what DDP's average is), then train()'s clipping and optimiser step."""
    seed_everything(cfg.training.seed)
    normals, seen = load_training_arrays(cfg, split)
    model = registry.build("prn", cfg)
    model.fit_prototypes(batches_of(normals, cfg.runtime.eval_batch_size))
    optimizer = make_optimizer(model, cfg)
    data = TrainingSet(normals, AnomalyGenerator(cfg, seen, cfg.data.resolved_category_kind,
                                                 gray=all(is_gray(n) for n in normals[:8])), cfg)
    steps = len(BalancedBatchSampler(len(normals), cfg, seed=cfg.training.seed, epoch=0))
    model.train()
    for epoch in range(epochs):
        samplers = [iter(BalancedBatchSampler(len(normals), cfg, seed=cfg.training.seed, epoch=epoch, rank=r,
                                              world_size=shares)) for r in range(shares)]
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * steps + step, steps * cfg.training.epochs, cfg)
            optimizer.zero_grad(set_to_none=True)
            for sampler in samplers:
                items = [data[key] for key in next(sampler)]
                images = torch.stack([item["image"] for item in items])
                masks = torch.stack([item["mask"] for item in items])
                (prn_loss(model(images), masks, cfg.training)[0] / shares).backward()
            torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), cfg.training.grad_clip)
            optimizer.step()
    return model


def head_difference(a: dict, b: dict) -> float:
    """Max |a - b| over the trained parameters (the encoder is frozen; batch-norm running
    statistics are averaged over ranks by DDP runs and accumulated per share by the emulation; the
    memory of the seen defects is built after training, and empty unless the config asks for it)."""
    from prn.model.network import trained_weight_keys
    keys = trained_weight_keys(a)
    assert keys and not any(k.startswith("encoder.") for k in keys)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in keys)


def one_thread(fn, *args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process: float sums depend on the thread count
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_process_run(demo_root, tmp_path_factory):
    """A 2-epoch `torchrun --nproc_per_node 2 -m prn fit` on the demo data: (run folder, seconds)."""
    from conftest import make_tiny_config
    out = tmp_path_factory.mktemp("ddp")
    config = out / "tiny.yaml"
    make_tiny_config(demo_root, out, epochs=2, lr=1e-3).save(config)
    t0 = time.perf_counter()
    done = torchrun("fit", "--config", str(config), "--run-dir", str(out / "run"), "--quiet", cwd=out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1  # rank 0 alone reports
    return out / "run", time.perf_counter() - t0


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_processes_train_as_one_process_that_normalises_each_share_apart(two_process_run):
    run, _ = two_process_run
    cfg, split = PRNConfig.load(run / "config.yaml"), Split.load(run / "split.json")
    ddp = load_checkpoint(run / "checkpoints" / "last.pt")["state_dict"]
    emulated = one_thread(per_share_training, cfg, split, 2, cfg.training.epochs).state_dict()
    plain = one_thread(lambda: train(cfg, split, run.parent / "one_process", progress=False)).model.state_dict()
    assert head_difference(ddp, emulated) <= TOLERANCE
    # the reason for the emulation: plain one-process training normalises the whole batch at once
    assert head_difference(ddp, plain) > 100 * TOLERANCE
    # rank 0 alone wrote: one metrics row per epoch, one calibration
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 1 + cfg.training.epochs
    assert (run / "checkpoints" / "model.pt").is_file()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_two_process_run_resumes_where_it_stopped(two_process_run, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(two_process_run[0], run)
    done = torchrun("fit", "--resume", str(run), "--epochs", "3", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    cfg, split = PRNConfig.load(run / "config.yaml"), Split.load(run / "split.json")
    payload = load_checkpoint(run / "checkpoints" / "last.pt")
    assert cfg.training.epochs == 3 and payload["epoch"] == 3
    emulated = one_thread(per_share_training, cfg, split, 2, 3).state_dict()
    assert head_difference(payload["state_dict"], emulated) <= TOLERANCE


FAILING_RANK = r'''
import os, sys
import prn.train
from prn.cli import main
from prn.errors import TrainingError

real, calls = prn.train.prn_loss, [0]

def loss_failing_on_rank_1(logits, mask, cfg, weight=None):
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 2:
        raise TrainingError("rank 1 could not go on (made to fail by the test)")
    return real(logits, mask, cfg, weight)

prn.train.prn_loss = loss_failing_on_rank_1
sys.exit(main())
'''


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failing_rank_stops_every_rank_with_its_message(demo_root, tiny_config, tmp_path):
    config = tmp_path / "tiny.yaml"
    tiny(tiny_config, demo_root, tmp_path).save(config)
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK)
    done = torchrun("fit", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--quiet",
                    cwd=tmp_path, script=script)
    assert done.returncode != 0
    assert "prn fit (rank 1 of 2): error: rank 1 could not go on" in done.stderr
    # torchrun's summary names rank 1 as the root cause and quotes its message
    root_cause = done.stderr.split("Root Cause")[1]
    assert "rank      : 1" in root_cause and "rank 1 could not go on" in root_cause
    assert "lost another process of this run" in done.stderr  # what rank 0 says


PID_FILE = r'''
import os, sys
from pathlib import Path
Path(os.environ["PID_DIR"], "rank" + os.environ["RANK"]).write_text(str(os.getpid()))
from prn.cli import main
sys.exit(main())
'''


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_rank_stops_the_run_instead_of_hanging(demo_root, tiny_config, tmp_path):
    config = tmp_path / "tiny.yaml"
    tiny(tiny_config, demo_root, tmp_path, epochs=200).save(config)
    script = tmp_path / "pids.py"
    script.write_text(PID_FILE)
    env = dict(os.environ, OMP_NUM_THREADS="1", PRN_DIST_TIMEOUT="60", PID_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             "2", str(script), "fit", "--config", str(config), "--run-dir", str(tmp_path / "run"),
                             "--quiet"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not (tmp_path / "run" / "metrics.csv").is_file():  # an epoch has been trained
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        os.kill(int((tmp_path / "rank1").read_text()), signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert time.monotonic() - killed < 60  # stopped, not waiting out a timeout
    root_cause = stderr.split("Root Cause")[1]
    assert "rank      : 1" in root_cause and "SIGKILL" in root_cause
