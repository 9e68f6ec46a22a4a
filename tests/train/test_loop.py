"""The training loop in-process (LocalSession): learning, checkpoints, resume, determinism,
metrics."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from kiln.data.dataset import prepare_data
from kiln.schema import load_config
from kiln.train.checkpoint import find_latest_checkpoint, read_state
from kiln.train.loop import (
    HeldRows,
    LoopHooks,
    eval_batches,
    keep_freed_memory,
    shuffle_stream,
    train_epochs,
)
from kiln.train.metrics import accuracy, classification_report, confusion_matrix, f1_macro
from kiln.train.session import LocalSession

OVERRIDES = ["train.epochs=3", "model.width=8", "train.cpus_per_worker=1", "train.lr=0.01"]


@pytest.fixture(scope="module")
def setup(ray_cluster):  # the loop streams its batches from Ray Data
    cfg = load_config(REPO / "configs/train/digits_cnn.yaml", OVERRIDES)
    return cfg, prepare_data(cfg.data)


def test_loop_learns_and_checkpoints_every_epoch(setup, tmp_path):
    cfg, data = setup
    session = LocalSession(tmp_path)
    reports = train_epochs(cfg, data, session)
    assert [r["epoch"] for r in reports] == [0, 1, 2]
    assert (
        reports[-1]["val_accuracy"] > 0.8 and reports[-1]["train_loss"] < reports[0]["train_loss"]
    )
    assert {"train_loss", "val_loss", "val_accuracy", "val_f1_macro", "lr"} <= set(reports[-1])
    latest = find_latest_checkpoint(tmp_path)
    assert read_state(latest)["epoch"] == 2
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "spec.json", "state.json"} <= {
        p.name for p in latest.iterdir()
    }


class CrashAfter(LocalSession):
    """A session whose process 'dies' right after reporting epoch ``n``."""

    def __init__(self, root, n):
        super().__init__(root)
        self.n = n

    def report(self, metrics, checkpoint_dir):
        super().report(metrics, checkpoint_dir)
        if metrics["epoch"] == self.n:
            raise SystemExit("crash")


def test_resume_continues_after_the_checkpoint_and_matches_an_uninterrupted_run(setup, tmp_path):
    cfg, data = setup
    full = train_epochs(cfg, data, LocalSession(tmp_path / "full"))
    with pytest.raises(SystemExit):
        train_epochs(cfg, data, CrashAfter(tmp_path / "crashed", 1))
    resumed = train_epochs(
        cfg,
        data,
        LocalSession(tmp_path / "after"),
        resume_from=find_latest_checkpoint(tmp_path / "crashed"),
    )
    assert [r["epoch"] for r in resumed] == [2]
    # weights, optimizer, LR schedule and per-epoch seeds are restored: the same result as no crash
    for key in ("train_loss", "val_loss", "val_accuracy", "lr"):
        assert resumed[0][key] == pytest.approx(full[-1][key], rel=1e-5), key


def test_same_seed_same_metrics_other_seed_differs(setup):
    cfg, data = setup
    a = train_epochs(cfg, data, LocalSession())
    b = train_epochs(cfg, data, LocalSession())
    assert a == [{**r, "samples_per_s": a[i]["samples_per_s"]} for i, r in enumerate(b)]
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 1})})
    assert train_epochs(other, data, LocalSession())[-1]["train_loss"] != a[-1]["train_loss"]


def test_loss_hook_replaces_cross_entropy(setup):
    import torch

    cfg, data = setup
    calls = []

    def loss(logits, xb, yb, ce):
        calls.append(len(yb))
        return ce(logits, yb) * 0.0 + torch.nn.functional.cross_entropy(logits, yb)

    one = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1})})
    train_epochs(one, data, LocalSession(), hooks=LoopHooks(loss=loss))
    assert sum(calls) == len(data.y_train) // 1


def test_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 500)
    p = np.where(rng.random(500) < 0.7, y, rng.integers(0, 4, 500))
    p[p == 3] = 2  # class 3 never predicted
    cm = confusion_matrix(y, p, 4)
    assert accuracy(cm) == pytest.approx(accuracy_score(y, p))
    assert f1_macro(cm) == pytest.approx(f1_score(y, p, average="macro"))
    report = classification_report(cm, ["a", "b", "c", "d"])
    assert report[3]["recall"] == 0.0 and sum(r["support"] for r in report) == 500


@pytest.mark.parametrize("sampler", ["oversample", "undersample"])
def test_samplers_balance_classes_batch_by_batch(sampler):
    import torch

    from kiln.train.loop import rebalance

    counts = np.array([900, 100])
    y = torch.tensor([0] * 90 + [1] * 10)
    picked = [y[rebalance(y, counts, sampler, torch.Generator().manual_seed(s))] for s in range(50)]
    share = torch.cat(picked).float().mean().item()  # share of class 1 after rebalancing
    assert 0.4 < share < 0.6
    sizes = {len(p) for p in picked}
    assert sizes == {100} if sampler == "oversample" else max(sizes) < 40
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(rebalance(y, counts, sampler, g1), rebalance(y, counts, sampler, g2))
    plain = rebalance(y, counts, "none", torch.Generator())
    assert plain.tolist() == list(range(100))


def _chunks(n: int, size: int):
    x = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    y = torch.arange(n) % 4
    return [{"x": x[i : i + size], "y": y[i : i + size]} for i in range(0, n, size)]


class Unread:
    """Batches that must not be read (a held shard replaces them)."""

    def __iter__(self):
        raise AssertionError("the source was read again")


def _drawn(batches) -> list[list[int]]:
    return [b["y"].tolist() + b["x"][:, 0].tolist() for b in batches]


def test_a_shard_that_fits_the_buffer_is_held_and_redrawn_exactly_as_streamed_again():
    held = HeldRows()
    first = _drawn(shuffle_stream(_chunks(50, 16), 8, 100, torch.Generator().manual_seed(3), held))
    assert held.chunks is not None and sum(len(c["y"]) for c in held.chunks) == 50
    again = _drawn(shuffle_stream(_chunks(50, 16), 8, 100, torch.Generator().manual_seed(4)))
    from_held = _drawn(shuffle_stream(Unread(), 8, 100, torch.Generator().manual_seed(4), held))
    assert from_held == again and from_held != first
    assert sorted(v for b in from_held for v in b[len(b) // 2 :]) == [3.0 * i for i in range(50)]


def test_a_shard_larger_than_the_buffer_streams_every_epoch_and_is_not_held():
    held = HeldRows()
    out = list(shuffle_stream(_chunks(300, 16), 8, 100, torch.Generator().manual_seed(0), held))
    assert held.chunks is None and sum(len(b["y"]) for b in out) == 300


def test_evaluation_holds_a_small_split_and_reads_it_again_from_memory(ray_cluster):
    import ray

    ds = ray.data.from_items([{"x": [float(i), 0.0], "y": i % 3} for i in range(40)])
    held = HeldRows()
    streamed = list(eval_batches(ds, 16, held, budget_bytes=1 << 20))
    assert held.chunks is not None and sorted(
        v for c in held.chunks for v in c["y"].tolist()
    ) == sorted(i % 3 for i in range(40))
    again = list(eval_batches(Unread(), 16, held, budget_bytes=1 << 20))
    assert [b["y"].tolist() for b in again] == [b["y"].tolist() for b in streamed]
    too_small = HeldRows()
    assert len(list(eval_batches(ds, 16, too_small, budget_bytes=100))) == 3
    assert too_small.chunks is None


def test_evaluation_fetches_chunks_and_cuts_them_into_steps(ray_cluster):
    import ray

    ds = ray.data.from_items([{"x": [float(i), 0.0], "y": i % 3} for i in range(40)])
    held = HeldRows()
    steps = list(eval_batches(ds, 8, held, budget_bytes=1 << 20, fetch_rows=32))
    assert all(len(b["y"]) <= 8 for b in steps) and sum(len(b["y"]) for b in steps) == 40
    assert held.chunks is not None and sum(len(c["y"]) for c in held.chunks) == 40
    plain = list(eval_batches(ds, 8, None, budget_bytes=1 << 20))
    assert torch.equal(torch.cat([b["x"] for b in steps]), torch.cat([b["x"] for b in plain]))
    again = list(eval_batches(Unread(), 8, held, budget_bytes=1 << 20))
    assert [b["y"].tolist() for b in again] == [b["y"].tolist() for b in steps]
    # held as the chunks fetched (5 rows of 8 in chunks of 32: steps 8,8,8,8 then 8), not joined
    assert [len(c["y"]) for c in held.chunks] == [32, 8]
    assert [len(b["y"]) for b in again] == [len(b["y"]) for b in steps]


def test_nothing_is_held_for_an_epoch_that_will_not_come():
    held = HeldRows()
    assert held.kept(later=True) is held and held.kept(later=False) is None
    list(shuffle_stream(_chunks(50, 16), 8, 100, torch.Generator().manual_seed(3), held))
    # once filled, the last epoch still reads from memory
    assert held.chunks is not None and held.kept(later=False) is held


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_step_sized_blocks_stay_in_the_heap():
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc without mallinfo2")

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
            )
        ]  # fmt: skip

    libc.mallinfo2.restype = MallInfo2
    assert keep_freed_memory()
    mapped = libc.mallinfo2().hblkhd
    block = torch.ones(4 << 20)  # 16 MB, as large as a training step's activations
    assert libc.mallinfo2().hblkhd == mapped  # from the heap, not a mapping of its own
    heap = libc.mallinfo2().arena
    del block
    assert libc.mallinfo2().arena == heap  # kept for the next step, not trimmed
