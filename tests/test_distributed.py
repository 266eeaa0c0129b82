"""bnbook.distributed: SyncBatchNorm on 2 and 3 local processes equals one big batch norm."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bnbook.nn
from bnbook.distributed import SyncBatchNorm, ghost_batch_norm, is_synchronized, launch
from bnbook.distributed_demo import compare_worker, reference, run_demo

TIMEOUT = 150.0  # seconds; spawning processes that import torch is slow on a loaded machine

CASES_2 = [
    # local batch sizes differ between ranks in every case
    {"sizes": [3, 5], "tail": [4, 4], "channels": 3, "steps": 3, "affine": True,
     "momentum": 0.3, "track": True},
    {"sizes": [2, 1], "tail": [], "channels": 4, "steps": 2, "affine": False,
     "momentum": None, "track": True},
    {"sizes": [4, 2], "tail": [5], "channels": 2, "steps": 2, "affine": True,
     "momentum": 0.1, "track": False},
    {"sizes": [1, 2], "tail": [2, 3, 2], "channels": 2, "steps": 2, "affine": True,
     "momentum": 0.5, "track": True},
    {"sizes": [6, 3], "tail": [5, 5], "channels": 4, "steps": 2, "affine": True,
     "momentum": 0.1, "track": True, "dtype": "float32"},
]  # fmt: skip
CASES_3 = [
    {"sizes": [2, 5, 1], "tail": [3, 3], "channels": 3, "steps": 3, "affine": True,
     "momentum": 0.2, "track": True},
    {"sizes": [3, 0, 4], "tail": [6], "channels": 2, "steps": 2, "affine": True,
     "momentum": 0.1, "track": True},
]  # fmt: skip


def _check_against_reference(per_rank, case):
    want = reference(case)
    f32 = case.get("dtype") == "float32"
    tol = {"rtol": 1e-5, "atol": 1e-5} if f32 else {"rtol": 1e-7, "atol": 1e-9}
    tol_stats = {"rtol": 1e-5, "atol": 1e-6} if f32 else {"rtol": 1e-9, "atol": 1e-12}
    got_y = np.concatenate([r["y"] for r in per_rank])
    got_dx = np.concatenate([r["dx"] for r in per_rank])
    assert got_y.dtype == want["y"].numpy().dtype
    np.testing.assert_allclose(got_y, want["y"].numpy(), **tol)
    np.testing.assert_allclose(got_dx, want["dx"].numpy(), **tol)
    if case["affine"]:
        for key in ("dweight", "dbias"):
            total = sum(r[key] for r in per_rank)  # what DDP's all-reduce adds up
            np.testing.assert_allclose(total, want[key].numpy(), **tol)
    if case["track"]:
        for r in per_rank:  # every rank holds the same, global running statistics
            for key in ("running_mean", "running_var"):
                np.testing.assert_allclose(r[key], want[key].numpy(), **tol_stats)
            assert int(r["num_batches_tracked"]) == int(want["num_batches_tracked"])


@pytest.mark.parametrize(("world_size", "cases"), [(2, CASES_2), (3, CASES_3)])
def test_sync_batch_norm_equals_one_batch_norm_over_the_concatenated_batch(world_size, cases):
    outs = launch(compare_worker, world_size, args=(cases,), timeout=TIMEOUT)
    for i, case in enumerate(cases):
        _check_against_reference([outs[rank][i] for rank in range(world_size)], case)


def test_demo_runs_and_sync_matches():
    summary = run_demo((3, 5), timeout=TIMEOUT)
    assert summary["max_dev_sync"] < 1e-10
    assert summary["max_dev_running_var"] < 1e-10
    # per-worker statistics differ from the global ones, visibly
    assert summary["max_dev_plain"] > 1e-2
    assert len(summary["worker_means"]) == 2


def test_launch_reports_a_failing_worker():
    # math.log(rank, world_size) raises on rank 0 (log of 0)
    with pytest.raises(RuntimeError, match="rank 0 of 2 failed"):
        launch(math.log, 2, timeout=TIMEOUT)


def test_launch_errors():
    with pytest.raises(ValueError, match="world_size"):
        launch(math.log, 0)
    with pytest.raises(ValueError, match="timeout"):
        launch(math.log, 2, timeout=0)


# --- single process: the fallback ------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 3, 4, 4), (2, 3, 2, 3, 2)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_falls_back_to_plain_batch_norm_without_a_process_group(shape, momentum):
    assert not is_synchronized()
    torch.manual_seed(0)
    ours = SyncBatchNorm(3, momentum=momentum).double()
    theirs = torch.nn.SyncBatchNorm(3, momentum=momentum).double()
    theirs.load_state_dict(ours.state_dict())
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64) * 2 + step
        torch.testing.assert_close(ours(x), F.batch_norm(
            x, None, None, theirs.weight, theirs.bias, True))  # fmt: skip
        theirs_rm = theirs.running_mean.clone()
        # torch's SyncBatchNorm runs its CPU fallback in training when not distributed
        theirs(x)
        assert not torch.equal(theirs_rm, theirs.running_mean)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval()
    theirs.eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("source", [torch.nn, bnbook.nn])
def test_convert_sync_batchnorm_replaces_layers_and_keeps_state(source):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), source.BatchNorm2d(3), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(12, 4), source.BatchNorm1d(4),
    )  # fmt: skip
    x = torch.randn(5, 2, 4, 4)
    model(x)  # some running statistics to carry over
    model.eval()
    want = model(x)
    converted = SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], SyncBatchNorm) and isinstance(converted[5], SyncBatchNorm)
    assert isinstance(converted[0], torch.nn.Conv2d)
    assert not converted[1].training
    torch.testing.assert_close(converted(x), want)
    bare = SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm1d(3))
    assert isinstance(bare, SyncBatchNorm)


def test_state_dict_compatible_with_torch():
    theirs = torch.nn.SyncBatchNorm(4)
    ours = SyncBatchNorm(4)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())


def test_errors():
    bn = SyncBatchNorm(3)
    with pytest.raises(ValueError, match="at least 2D"):
        bn(torch.randn(3))
    with pytest.raises(ValueError, match="channels"):
        bn(torch.randn(4, 2, 5))
    with pytest.raises(TypeError, match="floating"):
        bn(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="more than 1 value"):
        bn(torch.randn(1, 3))


# --- ghost batch norm ------------------------------------------------------------------


def test_ghost_batch_norm_normalizes_each_chunk_separately():
    x = torch.randn(10, 3, 4, generator=torch.Generator().manual_seed(0))
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    got = ghost_batch_norm(x, 4, w, b)
    want = torch.cat([F.batch_norm(c, None, None, w, b, True) for c in x.split(4)])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ghost_batch_norm(x, 10, w, b), F.batch_norm(
        x, None, None, w, b, True))  # fmt: skip
    torch.testing.assert_close(ghost_batch_norm(x, 64), F.batch_norm(x, None, None, training=True))


def test_ghost_batch_norm_errors():
    x = torch.randn(5, 2)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="ghost_batch_size"):
            ghost_batch_norm(x, bad)
    with pytest.raises(ValueError, match="more than 1 value"):
        ghost_batch_norm(x, 2)  # the last chunk has one sample of (N, C) input
    with pytest.raises(TypeError, match="floating"):
        ghost_batch_norm(torch.ones(4, 2, dtype=torch.long), 2)
