r"""MovieLens-100K loading, the leakage-free split, negatives and the datamodule."""
import pytest
import torch

from moegraph.data import (
    MovieLensDataModule,
    check_ratings,
    load_movielens100k,
    sample_negatives,
    temporal_split,
)
from moegraph.data.movielens import make_rows


def test_temporal_split_by_hand():
    # user 0: 10 ratings (1 test, 1 val); user 1: 20 ratings (2 test, 2 val);
    # user 2: 2 ratings (floor(0.2) = 0: all train). Times shuffled.
    user = torch.tensor([0] * 10 + [1] * 20 + [2] * 2)
    time = torch.cat([torch.tensor([5, 3, 9, 1, 7, 2, 8, 0, 6, 4]),
                      torch.arange(20).flip(0), torch.tensor([1, 0])])
    split = temporal_split(user, time, 0.1, 0.1)
    assert split[:10].tolist() == [0, 0, 2, 0, 0, 0, 1, 0, 0, 0]  # time 9 test, 8 val
    assert split[10:12].tolist() == [2, 2] and split[12:14].tolist() == [1, 1]
    assert (split[14:30] == 0).all() and (split[30:] == 0).all()


def test_temporal_split_ties_and_minimum():
    # Three ratings at the same time: input order breaks the tie; at least one each.
    split = temporal_split(torch.tensor([0, 0, 0]), torch.tensor([7, 7, 7]))
    assert split.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="val_ratio"):
        temporal_split(torch.tensor([0]), torch.tensor([0]), 0.5, 0.6)


@pytest.mark.parametrize("rating,user,item,match", [
    ([1, 6], [0, 1], [0, 1], "ratings must be integers in 1..5; rating #1 is 6"),
    ([0, 3], [0, 1], [0, 1], "rating #0 is 0"),
    ([2.5, 3], [0, 1], [0, 1], "rating #0 is 2.5"),
    ([1, 3], [0, 5], [0, 1], "user id 5 \\(rating #1\\) is out of range: there are 3 users"),
    ([1, 3], [0, 1], [-1, 1], "item id -1 \\(rating #0\\) is out of range: there are 4 items"),
])
def test_check_ratings(rating, user, item, match):
    with pytest.raises(ValueError, match=match):
        check_ratings(torch.tensor(user), torch.tensor(item), torch.tensor(rating), 3, 4)


def test_sample_negatives_avoids_observed():
    g = torch.Generator().manual_seed(0)
    num_items = 6
    user, item = torch.tensor([0, 0, 0, 0, 0, 1]), torch.tensor([0, 1, 2, 3, 4, 5])
    observed = torch.sort(user * num_items + item).values
    neg_user = torch.tensor([0] * 50 + [1] * 50)
    neg = sample_negatives(neg_user, num_items, observed, g)
    assert (neg[:50] == 5).all()  # user 0 rated every movie but 5
    assert (neg[50:] != 5).all() and neg[50:].unique().numel() > 1
    with pytest.raises(RuntimeError, match="almost every item"):
        sample_negatives(torch.tensor([0]), 1, torch.tensor([0]), g, max_rounds=3)


def test_make_rows_labels_and_masks():
    rows = make_rows(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 2]),
                     torch.tensor([0, 1]), torch.tensor([5, 6]), ["watch", "like", "rating"])
    assert rows["user"].tolist() == [0, 1, 0, 1] and rows["item"].tolist() == [2, 3, 5, 6]
    assert rows["y"]["watch"].tolist() == [1, 1, 0, 0]
    assert rows["y"]["like"][:2].tolist() == [1, 0] and rows["y"]["rating"][:2].tolist() == [4, 2]
    assert rows["mask"]["watch"].all()
    assert rows["mask"]["like"].tolist() == rows["mask"]["rating"].tolist() == [1, 1, 0, 0]


def _check_datamodule(dm):
    r = dm.ratings
    keys = set((r["user"] * dm.num_items + r["item"]).tolist())
    train_keys = set((dm.edge_index[0] * dm.num_items + dm.edge_index[1]).tolist())
    for split_id, split in enumerate(("train", "val", "test")):
        sel = dm.split == split_id
        split_keys = set((r["user"][sel] * dm.num_items + r["item"][sel]).tolist())
        # The message-passing graph holds exactly the training ratings.
        assert (split_keys <= train_keys) == (split == "train")
        if split != "train":
            assert not split_keys & train_keys
        rows = dm.rows(split)
        neg = ~rows["mask"]["like"]
        neg_keys = (rows["user"][neg] * dm.num_items + rows["item"][neg]).tolist()
        assert not set(neg_keys) & keys  # negatives are never rated pairs
        assert int(neg.sum()) == int(sel.sum()) * dm.num_negatives
    # Per user: every training rating is no later than any val, val no later than test.
    t = r["time"]
    for u in range(min(dm.num_users, 50)):
        m = r["user"] == u
        s, tu = dm.split[m], t[m]
        if (s == 1).any():
            assert tu[s == 0].max() <= tu[s == 1].min() <= tu[s == 1].max() <= tu[s == 2].min()


def test_datamodule_synthetic():
    dm = MovieLensDataModule(name="synthetic", batch_size=500, seed=1)
    dm.setup()
    _check_datamodule(dm)
    assert dm.net_kwargs() == {"num_users": 60, "num_items": 80, "user_channels": 4,
                               "item_channels": 3, "tasks": {"watch": 1, "like": 1, "rating": 1},
                               "encoder": "lightgcn"}
    assert dm.task_kwargs() == {"tasks": {"watch": "binary", "like": "binary",
                                          "rating": "regression"}}
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == -(-dm.num_rows("train") // 500)
    b = batches[0]
    assert set(b) == {"inputs", "group", "y", "mask"}
    assert set(b["inputs"]) == {"user_x", "item_x", "edge_index", "user", "item"}
    assert torch.equal(b["group"], b["inputs"]["user"])
    assert b["group"].shape == (500,) and set(b["y"]) == {"watch", "like", "rating"}
    # Training negatives are redrawn at each pass (epoch); validation rows are fixed.
    again = list(loader)
    first = torch.cat([x["inputs"]["item"][~x["mask"]["like"]] for x in batches]).sort().values
    second = torch.cat([x["inputs"]["item"][~x["mask"]["like"]] for x in again]).sort().values
    assert not torch.equal(first, second)
    v1 = next(iter(dm.val_dataloader()))["inputs"]["item"]
    v2 = next(iter(dm.val_dataloader()))["inputs"]["item"]
    assert torch.equal(v1, v2)


def test_datamodule_task_subset_and_errors():
    dm = MovieLensDataModule(name="synthetic", tasks=["rating"])
    assert dm.task_kwargs() == {"tasks": {"rating": "regression"}}
    assert set(next(iter(dm.test_dataloader()))["y"]) == {"rating"}
    with pytest.raises(ValueError, match="'tasks' must be distinct names"):
        MovieLensDataModule(name="synthetic", tasks=["watch", "click"])
    with pytest.raises(ValueError, match="needs 'root'"):
        MovieLensDataModule(name="movielens100k")
    with pytest.raises(ValueError, match="unknown dataset"):
        MovieLensDataModule(name="ml-1m")


def test_missing_files_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="u.data, u.item, u.user, u1.base, u1.test "
                                                "missing in .*MovieLens100K/raw. Offline, put"):
        load_movielens100k(tmp_path)


def test_movielens100k_real(real_data, tmp_path):
    root = real_data("MovieLens100K")
    raw = load_movielens100k(root.parent, cache_dir=tmp_path / "cache")
    assert (tmp_path / "cache" / "MovieLens100K" / "processed").is_dir()
    assert raw["user_x"].shape == (943, 24) and raw["item_x"].shape == (1682, 18)
    assert raw["rating"].numel() == 100_000
    assert raw["rating"].min() == 1 and raw["rating"].max() == 5
    dm = MovieLensDataModule(root=str(root.parent), cache_dir=str(tmp_path / "cache"))
    dm.setup()
    assert torch.bincount(dm.split).tolist() == [80_808, 9_596, 9_596]
    assert dm.edge_index.shape == (2, 80_808)
    _check_datamodule(dm)


def test_movielens100k_bad_ids(real_data, tmp_path):
    root = real_data("MovieLens100K")
    path = root / "raw" / "u.data"
    path.write_text(path.read_text() + "944\t1\t3\t881250949\n")
    with pytest.raises(ValueError, match="u.data: user id 944 is not listed in u.user"):
        load_movielens100k(root.parent)
