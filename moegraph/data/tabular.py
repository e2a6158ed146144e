r"""Tabular multi-task data: numeric and categorical columns, several labels.

Rows come from a CSV or parquet file, or from in-memory pandas frames; the
split is given (a split column, or one frame per split) or drawn at random.
Every statistic is fitted on the **training rows only** and then applied to
every split:

* numeric columns: mean and standard deviation (a constant column gets
  standard deviation 1); a missing value becomes the training mean (0 after
  standardisation);
* categorical columns: the categories seen in training, sorted; a category
  not seen in training (or missing) becomes "unknown": an all-zero one-hot
  block (``categorical_encoding="onehot"``) or index 0
  (``categorical_encoding="embedding"``, categories at 1..K);
* multiclass labels given as strings (or without ``num_classes``): the
  classes seen in training, sorted; a class not seen in training is an
  error.

A task's label may be missing (NaN or empty) on a row: the row is masked out
for that task. Labels are checked at setup: binary labels must be 0 or 1
(or booleans), multiclass labels integers in ``[0, C)``, regression labels
finite; each error names the task, the column and the split.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

SPLITS = ("train", "val", "test")
TASK_TYPES = ("binary", "multiclass", "regression")
ENCODINGS = ("onehot", "embedding")
METRICS = ("mean_auc", "mean_score", "loss")


def read_table(path: Union[str, Path]):
    r"""A pandas frame from a ``.csv`` (optionally compressed) or ``.parquet``
    file."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tabular data file {path} not found")
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        return pd.read_parquet(path)
    if ".csv" in name or name.endswith(".tsv"):
        return pd.read_csv(path, sep="\t" if name.endswith(".tsv") else ",")
    raise ValueError(f"unknown table format of {path}: use .csv, .csv.gz, .tsv or .parquet")


def _task_specs(tasks: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError("'tasks' must map each task name to its type, or to "
                         "{type, column, num_classes}")
    out = {}
    for name, spec in dict(tasks).items():
        spec = {"type": spec} if isinstance(spec, str) else dict(spec)
        kind = spec.get("type")
        if kind not in TASK_TYPES:
            raise ValueError(f"task {name!r}: type must be one of {TASK_TYPES} (got {kind!r})")
        unknown = set(spec) - {"type", "column", "num_classes"}
        if unknown:
            raise ValueError(f"task {name!r}: unknown keys {sorted(unknown)} (allowed: type, "
                             "column, num_classes)")
        spec.setdefault("column", name)
        if kind == "multiclass" and spec.get("num_classes") is not None \
                and int(spec["num_classes"]) < 2:
            raise ValueError(f"task {name!r}: a multiclass task needs num_classes >= 2")
        out[str(name)] = spec
    return out


class _Batches(IterableDataset):
    r"""Batches of one split; the training rows are reshuffled at each pass."""

    def __init__(self, dm: TabularMultiTaskDataModule, split: str):
        self.dm, self.split, self.passes = dm, split, 0

    def __len__(self) -> int:
        n = self.dm._loaded()[self.split]["x"].size(0)
        return (n + self.dm.batch_size - 1) // self.dm.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dm, t = self.dm, self.dm._loaded()[self.split]
        n = t["x"].size(0)
        if self.split == "train":
            g = torch.Generator().manual_seed(dm.seed * 100_003 + self.passes)
            self.passes += 1
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        for chunk in perm.split(dm.batch_size):
            if self.split == "train" and chunk.numel() == 1 and n > 1:
                continue  # a last training batch of one row: batch-norm statistics undefined
            inputs = {"x": t["x"][chunk]}
            if "x_cat" in t:
                inputs["x_cat"] = t["x_cat"][chunk]
            batch = dict(inputs=inputs, y={k: v[chunk] for k, v in t["y"].items()},
                         mask={k: v[chunk] for k, v in t["mask"].items()})
            if "group" in t:
                batch["group"] = t["group"][chunk]
            yield batch


class TabularMultiTaskDataModule(L.LightningDataModule):
    r"""Multi-task rows of a table: numeric and categorical feature columns,
    one label column per task (binary, regression or multiclass); see the
    module docstring for what is fitted on the training rows.

    Each batch is a dict: ``inputs`` (``x [B, F]``: standardised numeric
    columns then one-hot blocks; with embeddings also ``x_cat [B, K]``),
    ``y`` and ``mask`` (dicts by task, ``[B]``), and ``group [B]`` when
    ``group_column`` is set (GAUC).

    Args:
        path (str or dict, optional): a CSV/parquet file, or one per split
            (``{"train": ..., "val": ..., "test": ...}``).
        frames (DataFrame or dict, optional): in-memory rows instead of
            ``path``: one frame, or one per split.
        tasks (dict): task name -> type (``"binary"``, ``"regression"``,
            ``"multiclass"``), or -> ``{type, column, num_classes}`` (the
            column defaults to the task name).
        numeric (list, optional): numeric feature columns. (default: every
            numeric column that is not a label, split or group column)
        categorical (list, optional): categorical feature columns.
            (default: every other non-numeric column)
        categorical_encoding (str, optional): ``"onehot"`` or
            ``"embedding"``. (default: :obj:`"onehot"`)
        split_column (str, optional): column holding ``train`` / ``val`` /
            ``test`` (or 0 / 1 / 2) for a single frame or file; without it a
            single table is split at random (``val_ratio``, ``test_ratio``,
            ``seed``).
        val_ratio (float, optional): random split share. (default: :obj:`0.1`)
        test_ratio (float, optional): random split share. (default: :obj:`0.1`)
        group_column (str, optional): column grouping rows for GAUC (e.g.
            the user). (default: :obj:`None`)
        standardize (bool, optional): standardise numeric columns.
            (default: :obj:`True`)
        batch_size (int, optional): rows per batch. (default: :obj:`1024`)
        seed (int, optional): seed of the random split and the shuffling.
            (default: :obj:`0`)
        metric (str, optional): the validation metric to monitor (read by
            the config tree's ``optimized_metric``): ``"mean_auc"``,
            ``"mean_score"`` or ``"loss"``. (default: :obj:`"mean_score"`)
    """

    def __init__(self, tasks: Mapping[str, Any],
                 path: Optional[Union[str, Mapping[str, str]]] = None, frames: Any = None,
                 numeric: Optional[Sequence[str]] = None,
                 categorical: Optional[Sequence[str]] = None,
                 categorical_encoding: str = "onehot", split_column: Optional[str] = None,
                 val_ratio: float = 0.1, test_ratio: float = 0.1,
                 group_column: Optional[str] = None, standardize: bool = True,
                 batch_size: int = 1024, seed: int = 0, metric: str = "mean_score"):
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"'metric' must be one of {METRICS} (got {metric!r})")
        self.metric = metric
        if (path is None) == (frames is None):
            raise ValueError("give exactly one of 'path' (a CSV/parquet file, or one per split) "
                             "and 'frames' (pandas frames)")
        if categorical_encoding not in ENCODINGS:
            raise ValueError(f"'categorical_encoding' must be one of {ENCODINGS} (got "
                             f"{categorical_encoding!r})")
        if not (0 <= val_ratio < 1 and 0 <= test_ratio < 1 and val_ratio + test_ratio < 1):
            raise ValueError(f"need 0 <= val_ratio, test_ratio and val_ratio + test_ratio < 1 "
                             f"(got {val_ratio}, {test_ratio})")
        if int(batch_size) < 1:
            raise ValueError(f"'batch_size' must be positive (got {batch_size})")
        self.task_specs = _task_specs(tasks)
        self.path, self.frames = path, frames
        self.numeric = None if numeric is None else list(numeric)
        self.categorical = None if categorical is None else list(categorical)
        self.categorical_encoding = categorical_encoding
        self.split_column, self.group_column = split_column, group_column
        self.val_ratio, self.test_ratio = val_ratio, test_ratio
        self.standardize = standardize
        self.batch_size, self.seed = int(batch_size), seed
        self.tensors: Optional[dict[str, dict[str, Any]]] = None

    # -- reading and splitting ------------------------------------------------
    def _split_frames(self) -> dict[str, Any]:
        src: Any = self.frames if self.frames is not None else self.path  # frames, or path(s)
        if isinstance(src, Mapping):
            missing = [s for s in ("train", "val") if s not in src]
            if missing or set(src) - set(SPLITS):
                raise ValueError(f"per-split input needs keys train, val (and test); got "
                                 f"{sorted(src)}")
            frames = {s: (read_table(v) if self.frames is None else v) for s, v in src.items()}
            frames.setdefault("test", frames["val"].iloc[:0])
            return frames
        df = read_table(src) if self.frames is None else src
        if self.split_column is not None:
            if self.split_column not in df.columns:
                raise ValueError(f"split column {self.split_column!r} not in the table "
                                 f"(columns: {list(df.columns)})")
            col = df[self.split_column]
            names = col.map(lambda v: SPLITS[int(v)] if isinstance(v, (int, np.integer))
                            and 0 <= int(v) < 3 else str(v))
            bad = ~names.isin(SPLITS)
            if bool(bad.any()):
                raise ValueError(f"split column {self.split_column!r} must hold train/val/test "
                                 f"or 0/1/2; got {col[bad].iloc[0]!r}")
            return {s: df[(names == s).to_numpy()] for s in SPLITS}
        n = len(df)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).numpy()
        n_test, n_val = int(self.test_ratio * n), int(self.val_ratio * n)
        parts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val],
                 "train": perm[n_test + n_val:]}
        return {s: df.iloc[np.sort(parts[s])] for s in SPLITS}

    def _columns(self, train) -> tuple[list[str], list[str]]:
        import pandas as pd

        label_cols = {spec["column"] for spec in self.task_specs.values()}
        reserved = label_cols | {self.split_column, self.group_column}
        for spec_name, spec in self.task_specs.items():
            if spec["column"] not in train.columns:
                raise ValueError(f"task {spec_name!r}: label column {spec['column']!r} not in "
                                 f"the table (columns: {list(train.columns)})")
        if self.group_column is not None and self.group_column not in train.columns:
            raise ValueError(f"group column {self.group_column!r} not in the table")
        free = [c for c in train.columns if c not in reserved]
        numeric = self.numeric if self.numeric is not None else [
            c for c in free if pd.api.types.is_numeric_dtype(train[c])
            and not pd.api.types.is_bool_dtype(train[c])
            and (self.categorical is None or c not in self.categorical)]
        categorical = self.categorical if self.categorical is not None else [
            c for c in free if c not in numeric]
        for c in [*numeric, *categorical]:
            if c not in train.columns:
                raise ValueError(f"feature column {c!r} not in the table (columns: "
                                 f"{list(train.columns)})")
            if c in reserved:
                raise ValueError(f"column {c!r} is a label, split or group column, not a "
                                 "feature")
        both = set(numeric) & set(categorical)
        if both:
            raise ValueError(f"columns {sorted(both)} are both numeric and categorical")
        if not numeric and not categorical:
            raise ValueError("no feature column: give 'numeric' and/or 'categorical'")
        for c in numeric:
            if not pd.api.types.is_numeric_dtype(train[c]):
                raise ValueError(f"numeric column {c!r} holds non-numbers (dtype "
                                 f"{train[c].dtype}); list it in 'categorical'")
        return list(numeric), list(categorical)

    # -- fitting (train rows only) and encoding -------------------------------
    def fit(self, train) -> dict[str, Any]:
        r"""The statistics of the training rows: numeric means and standard
        deviations, categories per categorical column, classes per
        multiclass task without ``num_classes``."""
        numeric, categorical = self._columns(train)
        values = train[numeric].to_numpy(dtype=np.float64) if numeric else np.zeros((len(train), 0))
        with np.errstate(invalid="ignore"):
            mean = np.nanmean(values, axis=0) if len(train) else np.zeros(len(numeric))
            std = np.nanstd(values, axis=0) if len(train) else np.ones(len(numeric))
        fill = np.where(np.isfinite(mean), mean, 0.0)  # a missing value: the training mean
        std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
        mean = fill if self.standardize else np.zeros_like(fill)
        std = std if self.standardize else np.ones_like(std)
        cats = {c: sorted({str(v) for v in train[c].dropna()}) for c in categorical}
        classes = {}
        for t, spec in self.task_specs.items():
            if spec["type"] == "multiclass" and spec.get("num_classes") is None:
                classes[t] = sorted({v for v in train[spec["column"]].dropna()}, key=str)
                if len(classes[t]) < 2:
                    raise ValueError(f"task {t!r}: the training rows hold {len(classes[t])} "
                                     "class(es); a multiclass task needs at least 2")
        return dict(numeric=numeric, categorical=categorical, mean=mean, std=std,
                    fill=fill, categories=cats, classes=classes)

    def encode(self, df, split: str) -> dict[str, Any]:
        r"""Tensors of one split with the training statistics."""
        st = self.stats
        blocks = []
        if st["numeric"]:
            v = df[st["numeric"]].to_numpy(dtype=np.float64)
            v = np.where(np.isnan(v), st["fill"], v)
            blocks.append((v - st["mean"]) / st["std"])
        codes = []
        for c in st["categorical"]:
            index = {k: i + 1 for i, k in enumerate(st["categories"][c])}
            code = np.array([0 if v is None or v != v else index.get(str(v), 0)
                             for v in df[c]], dtype=np.int64)
            if self.categorical_encoding == "onehot":
                onehot = np.zeros((len(df), len(index)))
                rows = np.nonzero(code)[0]
                onehot[rows, code[rows] - 1] = 1.0
                blocks.append(onehot)
            else:
                codes.append(code)
        x = np.concatenate(blocks, 1) if blocks else np.zeros((len(df), 0))
        out: dict[str, Any] = {"x": torch.tensor(x, dtype=torch.float32)}
        if self.categorical_encoding == "embedding" and codes:
            out["x_cat"] = torch.tensor(np.stack(codes, 1))
        y, mask = {}, {}
        for t, spec in self.task_specs.items():
            y[t], mask[t] = self._labels(t, spec, df[spec["column"]], split)
        out["y"], out["mask"] = y, mask
        if self.group_column is not None:
            import pandas as pd

            out["group"] = torch.tensor(pd.factorize(df[self.group_column])[0])
        return out

    def _labels(self, task: str, spec: dict[str, Any], col, split: str) -> tuple[Tensor, Tensor]:
        import pandas as pd

        where = f"task {task!r} (column {spec['column']!r}, {split} rows)"
        present = ~pd.isna(col).to_numpy()
        kind = spec["type"]
        if kind == "multiclass" and task in self.stats["classes"]:
            index = {k: i for i, k in enumerate(self.stats["classes"][task])}
            unseen = [v for v, p in zip(col, present, strict=True) if p and v not in index]
            if unseen:
                raise ValueError(f"{where}: class {unseen[0]!r} is not among the training "
                                 f"classes {self.stats['classes'][task]}")
            vals = np.array([index[v] if p else 0 for v, p in zip(col, present, strict=True)],
                            dtype=np.int64)
            return torch.tensor(vals), torch.tensor(present)
        try:
            vals = pd.to_numeric(col, errors="raise").to_numpy(dtype=np.float64)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: labels must be numbers for a {kind} task ({err})") \
                from None
        v = vals[present]
        if kind == "binary":
            bad = (v != 0) & (v != 1)
            if bad.any():
                raise ValueError(f"{where} is binary: labels must be 0 or 1, got {v[bad][0]} "
                                 f"({int(bad.sum())} such labels)")
        elif kind == "multiclass":
            C = int(spec["num_classes"])
            bad = (v < 0) | (v >= C) | (v != np.round(v))
            if bad.any():
                raise ValueError(f"{where} is multiclass with {C} classes: labels must be "
                                 f"integers in [0, {C - 1}], got {v[bad][0]}")
        elif not np.isfinite(v).all():
            raise ValueError(f"{where}: regression labels must be finite")
        vals = np.where(present, vals, 0.0)
        dtype = torch.long if kind == "multiclass" else torch.float32
        return torch.tensor(vals).to(dtype), torch.tensor(present)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.tensors is not None:
            return
        frames = self._split_frames()
        if len(frames["train"]) == 0:
            raise ValueError("the training split is empty")
        self.stats = self.fit(frames["train"])
        self.tensors = {s: self.encode(frames[s], s) for s in SPLITS}

    def _loaded(self) -> dict[str, dict[str, Any]]:
        r"""The encoded splits, loaded on first use."""
        self.setup()
        assert self.tensors is not None  # set by setup()
        return self.tensors

    # -- what the network and the task need ------------------------------------
    def out_channels(self) -> dict[str, int]:
        return {t: (self.num_classes(t) if spec["type"] == "multiclass" else 1)
                for t, spec in self.task_specs.items()}

    def num_classes(self, task: str) -> int:
        spec = self.task_specs[task]
        if spec.get("num_classes") is not None:
            return int(spec["num_classes"])
        return len(self.stats["classes"][task])

    def net_kwargs(self) -> dict[str, Any]:
        r"""What the network needs to know of the data (given by ``train``)."""
        x = self._loaded()["train"]["x"]
        cards = ([len(self.stats["categories"][c]) + 1 for c in self.stats["categorical"]]
                 if self.categorical_encoding == "embedding" else [])
        return {"encoder": "tabular", "in_channels": x.size(1),
                "cardinalities": cards, "tasks": self.out_channels()}

    def task_kwargs(self) -> dict[str, Any]:
        r"""What the LightningModule needs to know of the data."""
        self.setup()
        return {"tasks": {t: ({"type": "multiclass", "num_classes": self.num_classes(t)}
                              if spec["type"] == "multiclass" else spec["type"])
                          for t, spec in self.task_specs.items()}}

    def _loader(self, split: str) -> DataLoader:
        self.setup()
        return DataLoader(_Batches(self, split), batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
