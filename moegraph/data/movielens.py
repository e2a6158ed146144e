r"""MovieLens-100K as a graph-based multi-task recommendation problem.

Rows are (user, movie) pairs; each carries up to three labels:

* ``watch`` (binary): 1 for an observed rating, 0 for a sampled unobserved
  pair (every row has it);
* ``like`` (binary): ``rating >= 4``, on observed pairs only;
* ``rating`` (regression): the rating 1..5, on observed pairs only.

A task without a label for a row is masked out (``batch["mask"][task]``).

**Split (leakage-free, by time).** Per user, ratings are ordered by timestamp
(ties by their order in ``u.data``); the last ``test_ratio`` (10%) of each
user's ratings go to test, the ``val_ratio`` (10%) before them to
validation, the rest to training (``floor(ratio * n)`` ratings, at least one
when the user has three or more). The message-passing graph holds the
training ratings only. Negatives for ``watch`` are drawn per positive row,
for the same user, among movies the user never rated in any split; training
negatives are redrawn every epoch, validation and test negatives once.

Node features come from PyG's :class:`~torch_geometric.datasets.MovieLens100K`
(user: age, gender, occupation; movie: genres). PyG's class keeps timestamps
for its ``u1.base`` part only, so the ratings with their timestamps are read
from ``u.data`` (the same 100,000 ratings as ``u1.base`` + ``u1.test``).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

TASK_TYPES = {"watch": "binary", "like": "binary", "rating": "regression"}
RAW_FILES = ("u.data", "u.item", "u.user", "u1.base", "u1.test")
SPLITS = ("train", "val", "test")


def check_ratings(user: Tensor, item: Tensor, rating: Tensor, num_users: int,
                  num_items: int) -> None:
    r"""Raise a clear error for a rating outside 1..5 or an id out of range
    (ids are 0-based row indices of the user / item feature matrices)."""
    if not (user.numel() == item.numel() == rating.numel()):
        raise ValueError(f"user, item and rating must have one entry per rating (got "
                         f"{user.numel()}, {item.numel()}, {rating.numel()})")
    if rating.numel() == 0:
        raise ValueError("no ratings")
    bad = (rating < 1) | (rating > 5) | (rating != rating.round())
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"ratings must be integers in 1..5; rating #{i} is "
                         f"{rating[i].item()} ({int(bad.sum())} such ratings)")
    for name, ids, n in (("user", user, num_users), ("item", item, num_items)):
        bad = (ids < 0) | (ids >= n)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"{name} id {int(ids[i])} (rating #{i}) is out of range: there "
                             f"are {n} {name}s (ids 0..{n - 1})")


def temporal_split(user: Tensor, time: Tensor, val_ratio: float = 0.1,
                   test_ratio: float = 0.1) -> Tensor:
    r"""Per user, by time: the last ``test_ratio`` of the user's ratings -> 2
    (test), the ``val_ratio`` before them -> 1 (validation), the rest -> 0
    (train). Each share is ``floor(ratio * n)``, raised to one when the user
    has at least three ratings. Ties in time keep their input order.

    Returns:
        ``[R]`` long tensor of split ids.
    """
    if not (0 <= val_ratio < 1 and 0 < test_ratio < 1 and val_ratio + test_ratio < 1):
        raise ValueError(f"need 0 <= val_ratio, 0 < test_ratio, val_ratio + test_ratio < 1 "
                         f"(got {val_ratio}, {test_ratio})")
    R = user.numel()
    order = torch.argsort(time, stable=True)
    order = order[torch.argsort(user[order], stable=True)]  # by user, then time
    u = user[order]
    counts = torch.bincount(u)
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(R) - start[u]  # rank of each rating within its user, by time
    n = counts[u]
    floor = lambda r: torch.where(n >= 3, (r * n).floor().clamp_min(1),  # noqa: E731
                                  (r * n).floor()).long()
    n_test = floor(test_ratio)
    n_val = floor(val_ratio) if val_ratio > 0 else torch.zeros_like(n)
    split_sorted = torch.zeros(R, dtype=torch.long)
    split_sorted[pos >= n - n_test] = 2
    split_sorted[(pos >= n - n_test - n_val) & (pos < n - n_test)] = 1
    split = torch.empty(R, dtype=torch.long)
    split[order] = split_sorted
    return split


def sample_negatives(user: Tensor, num_items: int, observed: Tensor,
                     generator: torch.Generator, max_rounds: int = 100) -> Tensor:
    r"""One unobserved item per entry of ``user``: uniform over the items,
    redrawn while the pair is in ``observed`` (sorted keys
    ``user * num_items + item`` of every rating, all splits)."""
    item = torch.randint(num_items, user.shape, generator=generator)
    for _ in range(max_rounds):
        keys = user * num_items + item
        pos = torch.searchsorted(observed, keys).clamp_max(observed.numel() - 1)
        clash = observed[pos] == keys
        if not bool(clash.any()):
            return item
        item[clash] = torch.randint(num_items, (int(clash.sum()),), generator=generator)
    raise RuntimeError("could not sample unobserved items: the users rated almost every item")


def synthetic_ratings(num_users: int = 60, num_items: int = 80, num_ratings: int = 1200,
                      user_channels: int = 4, item_channels: int = 3,
                      seed: int = 0) -> dict[str, Tensor]:
    r"""A small random rating table in the layout of :func:`load_movielens100k`
    (for tests and smoke runs without the real files): ratings depend on a
    user and an item factor, which pairs are observed on a user activity and
    an item popularity; all four are feature columns, so every task is
    learnable (``user_channels`` and ``item_channels`` at least 2)."""
    g = torch.Generator().manual_seed(seed)
    pu, pi = torch.randn(num_users, generator=g), torch.randn(num_items, generator=g)
    activity, popularity = torch.randn(num_users, generator=g), torch.randn(num_items,
                                                                           generator=g)
    # Observed pairs: the top scores of activity + popularity + Gumbel noise.
    gumbel = -torch.log(-torch.log(torch.rand(num_users, num_items, generator=g)))
    keys = torch.topk((activity[:, None] + popularity[None, :] + gumbel).flatten(),
                      num_ratings).indices
    user, item = keys // num_items, keys % num_items
    score = pu[user] * pi[item] + 0.5 * torch.randn(num_ratings, generator=g)
    rating = (3 + score.round()).clamp(1, 5).long()
    return dict(user=user, item=item, rating=rating,
                time=torch.randint(10**6, (num_ratings,), generator=g),
                user_x=torch.cat([pu[:, None], activity[:, None],
                                  torch.randn(num_users, user_channels - 2, generator=g)], 1),
                item_x=torch.cat([pi[:, None], popularity[:, None],
                                  torch.randn(num_items, item_channels - 2, generator=g)], 1))


def load_movielens100k(root: str | Path, cache_dir: Optional[str | Path] = None
                       ) -> dict[str, Tensor]:
    r"""Ratings and node features of MovieLens-100K.

    Args:
        root (str): folder holding ``MovieLens100K/raw/`` (``u.data``,
            ``u.item``, ``u.user``, ``u1.base``, ``u1.test``).
        cache_dir (str, optional): writable folder the raw files are copied to
            before PyG writes ``processed/`` beside them; :obj:`None` loads in
            place.

    Returns:
        dict with ``user``, ``item`` (0-based), ``rating``, ``time`` per rating
        and ``user_x [943, 24]``, ``item_x [1682, 18]``.
    """
    import pandas as pd
    from torch_geometric.datasets import MovieLens100K

    raw = Path(root) / "MovieLens100K" / "raw"
    missing = [f for f in RAW_FILES if not (raw / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"MovieLens-100K: {', '.join(missing)} missing in {raw}. Offline, put the files "
            "of ml-100k.zip (https://files.grouplens.org/datasets/movielens/ml-100k.zip) in "
            f"{raw}, or point MOEGRAPH_DATA_DIR / data.root at a folder holding "
            "MovieLens100K/raw/.")
    base = Path(root) / "MovieLens100K"
    if cache_dir is not None:
        base = Path(cache_dir) / "MovieLens100K"
        if not all((base / "raw" / f).is_file() for f in RAW_FILES):
            (base / "raw").mkdir(parents=True, exist_ok=True)
            for f in RAW_FILES:
                shutil.copy2(raw / f, base / "raw" / f)
    hetero = MovieLens100K(str(base))[0]
    user_x, item_x = hetero["user"].x, hetero["movie"].x

    # Ids as PyG maps them: row order of u.user / u.item.
    users = pd.read_csv(base / "raw" / "u.user", sep="|", header=None, encoding="ISO-8859-1")
    items = pd.read_csv(base / "raw" / "u.item", sep="|", header=None, encoding="ISO-8859-1")
    user_map = {int(k): i for i, k in enumerate(users[0])}
    item_map = {int(k): i for i, k in enumerate(items[0])}
    df = pd.read_csv(base / "raw" / "u.data", sep="\t", header=None,
                     names=["user", "item", "rating", "time"])
    user = torch.tensor([user_map.get(int(u), -1 - int(u)) for u in df["user"]])
    item = torch.tensor([item_map.get(int(i), -1 - int(i)) for i in df["item"]])
    for name, ids, col in (("user", user, "user"), ("item", item, "item")):
        if bool((ids < 0).any()):
            bad = int(df[col][int((ids < 0).nonzero()[0])])
            raise ValueError(f"u.data: {name} id {bad} is not listed in u.{name}")
    return dict(user=user, item=item, rating=torch.tensor(df["rating"].values),
                time=torch.tensor(df["time"].values), user_x=user_x, item_x=item_x)


def make_rows(user: Tensor, item: Tensor, rating: Tensor, neg_user: Tensor,
              neg_item: Tensor, tasks: list[str]) -> dict[str, Any]:
    r"""Rows of one split: the positives then the negatives, with labels and
    masks per task (``like`` and ``rating`` on the positives only)."""
    P, Q = user.numel(), neg_user.numel()
    observed = torch.cat([torch.ones(P, dtype=torch.bool), torch.zeros(Q, dtype=torch.bool)])
    r = torch.cat([rating.float(), torch.zeros(Q)])
    labels = {"watch": observed.float(), "like": (r >= 4).float(), "rating": r}
    masks = {"watch": torch.ones(P + Q, dtype=torch.bool), "like": observed,
             "rating": observed}
    return dict(user=torch.cat([user, neg_user]), item=torch.cat([item, neg_item]),
                y={t: labels[t] for t in tasks}, mask={t: masks[t] for t in tasks})


class _PairBatches(IterableDataset):
    r"""Batches of (user, item) rows of one split; training negatives are
    redrawn and rows shuffled at each pass."""

    def __init__(self, dm: MovieLensDataModule, split: str):
        self.dm, self.split, self.passes = dm, split, 0

    def __len__(self) -> int:
        n = self.dm.num_rows(self.split)
        return (n + self.dm.batch_size - 1) // self.dm.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dm = self.dm
        if self.split == "train":
            g = torch.Generator().manual_seed(dm.seed * 100_003 + self.passes)
            self.passes += 1
            rows = dm.rows("train", generator=g)
            perm = torch.randperm(rows["user"].numel(), generator=g)
        else:
            rows = dm.rows(self.split)
            perm = torch.arange(rows["user"].numel())
        for chunk in perm.split(dm.batch_size):
            user = rows["user"][chunk]
            yield dict(inputs=dict(user_x=dm.user_x, item_x=dm.item_x,
                                   edge_index=dm.edge_index, user=user,
                                   item=rows["item"][chunk]),
                       group=user, y={t: v[chunk] for t, v in rows["y"].items()},
                       mask={t: v[chunk] for t, v in rows["mask"].items()})


class MovieLensDataModule(L.LightningDataModule):
    r"""MovieLens-100K (or a small synthetic rating table) as multi-task
    (user, movie) rows over the bipartite training graph; see the module
    docstring for the tasks, the split and the negatives.

    Each batch is a dict: ``inputs`` (the network's keyword arguments:
    ``user_x [U, Fu]``, ``item_x [I, Fi]``, ``edge_index [2, M]`` (training
    ratings, user -> item indices), ``user [B]``, ``item [B]``), ``group``
    (the user of each row, for GAUC), ``y`` and ``mask`` (dicts by task,
    ``[B]``).

    Args:
        name (str, optional): ``"movielens100k"`` or ``"synthetic"``.
            (default: :obj:`"movielens100k"`)
        root (str, optional): folder holding ``MovieLens100K/raw``.
        cache_dir (str, optional): where the raw files are copied before PyG
            processes them.
        tasks (list, optional): tasks among ``watch``, ``like``, ``rating``.
            (default: all three)
        val_ratio (float, optional): per-user share of validation ratings.
            (default: :obj:`0.1`)
        test_ratio (float, optional): per-user share of test ratings.
            (default: :obj:`0.1`)
        num_negatives (int, optional): sampled unobserved pairs per observed
            one. (default: :obj:`1`)
        batch_size (int, optional): rows per batch. (default: :obj:`8192`)
        seed (int, optional): seed of the negatives. (default: :obj:`0`)
        synthetic_kwargs (dict, optional): arguments of
            :func:`synthetic_ratings` (``name="synthetic"``).
    """

    def __init__(self, name: str = "movielens100k", root: Optional[str] = None,
                 cache_dir: Optional[str] = None, tasks: Optional[list[str]] = None,
                 val_ratio: float = 0.1, test_ratio: float = 0.1, num_negatives: int = 1,
                 batch_size: int = 8192, seed: int = 0,
                 synthetic_kwargs: Optional[dict[str, Any]] = None):
        super().__init__()
        if name not in ("movielens100k", "synthetic"):
            raise ValueError(f"unknown dataset {name!r}; known: 'movielens100k', 'synthetic'")
        tasks = list(TASK_TYPES) if tasks is None else list(tasks)
        unknown = [t for t in tasks if t not in TASK_TYPES]
        if unknown or not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"'tasks' must be distinct names among {list(TASK_TYPES)} "
                             f"(got {tasks})")
        if num_negatives < 1 or batch_size < 1:
            raise ValueError("'num_negatives' and 'batch_size' must be positive")
        if name == "movielens100k" and root is None:
            raise ValueError("MovieLens-100K needs 'root' (the folder holding "
                             "MovieLens100K/raw)")
        self.name, self.root, self.cache_dir = name, root, cache_dir
        self.tasks = tasks
        self.val_ratio, self.test_ratio = val_ratio, test_ratio
        self.num_negatives, self.batch_size, self.seed = num_negatives, batch_size, seed
        self.synthetic_kwargs = dict(synthetic_kwargs or {})
        self.ratings: Optional[dict[str, Tensor]] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.ratings is not None:
            return
        if self.name == "synthetic":
            raw = synthetic_ratings(**self.synthetic_kwargs)
        else:
            raw = load_movielens100k(self.root, self.cache_dir)
        self.user_x, self.item_x = raw["user_x"].float(), raw["item_x"].float()
        self.num_users, self.num_items = self.user_x.size(0), self.item_x.size(0)
        check_ratings(raw["user"], raw["item"], raw["rating"], self.num_users, self.num_items)
        self.ratings = raw
        self.split = temporal_split(raw["user"], raw["time"], self.val_ratio, self.test_ratio)
        self.observed = torch.sort(raw["user"] * self.num_items + raw["item"]).values
        train = self.split == 0
        self.edge_index = torch.stack([raw["user"][train], raw["item"][train]])  # [2, M]
        g = torch.Generator().manual_seed(self.seed)
        self._fixed = {s: self.rows(s, generator=g) for s in ("val", "test")}

    def num_rows(self, split: str) -> int:
        self.setup()
        return int((self.split == SPLITS.index(split)).sum()) * (1 + self.num_negatives)

    def rows(self, split: str, generator: Optional[torch.Generator] = None) -> dict[str, Any]:
        r"""All rows of ``split`` (val / test: the fixed ones unless a
        ``generator`` asks for new negatives)."""
        self.setup()
        if generator is None and split in getattr(self, "_fixed", {}):
            return self._fixed[split]
        if generator is None:
            generator = torch.Generator().manual_seed(self.seed)
        keep = self.split == SPLITS.index(split)
        r = self.ratings
        user, item, rating = r["user"][keep], r["item"][keep], r["rating"][keep]
        neg_user = user.repeat(self.num_negatives)
        neg_item = sample_negatives(neg_user, self.num_items, self.observed, generator)
        return make_rows(user, item, rating, neg_user, neg_item, self.tasks)

    def net_kwargs(self) -> dict[str, Any]:
        r"""What the network needs to know of the data (given by ``train``)."""
        self.setup()
        return {"encoder": "lightgcn", "num_users": self.num_users, "num_items": self.num_items,
                "user_channels": self.user_x.size(1), "item_channels": self.item_x.size(1),
                "tasks": {t: 1 for t in self.tasks}}

    def task_kwargs(self) -> dict[str, Any]:
        r"""What the LightningModule needs to know of the data."""
        return {"tasks": {t: TASK_TYPES[t] for t in self.tasks}}

    def _loader(self, split: str) -> DataLoader:
        self.setup()
        return DataLoader(_PairBatches(self, split), batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
