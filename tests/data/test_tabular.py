r"""TabularMultiTaskDataModule: statistics fitted on the training rows only, encodings by
hand, label checks naming the task, files, and a short end-to-end fit."""
import numpy as np
import pandas as pd
import pytest
import torch

from moegraph.data import TabularMultiTaskDataModule, read_table

TASKS = {"click": "binary", "spend": "regression",
         "kind": {"type": "multiclass", "column": "kind_label"}}


def frame(n=40, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "age": rng.normal(40, 10, n), "income": rng.exponential(3.0, n),
        "city": rng.choice(["paris", "lyon", "nice"], n),
        "click": rng.integers(0, 2, n).astype(float), "spend": rng.normal(0, 1, n),
        "kind_label": rng.choice(["a", "b", "c"], n),
        "split": ["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4),
    })
    return df


def make(df, **kwargs):
    args = dict(frames=df, tasks=TASKS, split_column="split", batch_size=8) | kwargs
    dm = TabularMultiTaskDataModule(**args)
    dm.setup()
    return dm


def test_statistics_come_from_training_rows_only():
    df = frame()
    train = df[df.split == "train"]
    dm = make(df)
    assert dm.stats["numeric"] == ["age", "income"] and dm.stats["categorical"] == ["city"]
    np.testing.assert_allclose(dm.stats["mean"], train[["age", "income"]].mean().to_numpy())
    np.testing.assert_allclose(dm.stats["std"], train[["age", "income"]].std(ddof=0).to_numpy())
    assert dm.stats["categories"]["city"] == sorted(set(train.city))
    assert dm.stats["classes"]["kind"] == sorted(set(train.kind_label))
    # Wild validation / test rows (new values, a new city) change no statistic and no
    # training tensor.
    wild = df.copy()
    rows = wild.split != "train"
    wild.loc[rows, "age"] = 1e6
    wild.loc[rows, "income"] = -5e3
    wild.loc[rows, "city"] = "tokyo"
    dm2 = make(wild)
    for key in ("mean", "std", "fill"):
        np.testing.assert_array_equal(dm.stats[key], dm2.stats[key])
    assert dm2.stats["categories"] == dm.stats["categories"]
    assert torch.equal(dm.tensors["train"]["x"], dm2.tensors["train"]["x"])
    # An unseen city is "unknown": an all-zero one-hot block.
    assert dm2.tensors["val"]["x"][:, 2:].abs().sum() == 0


def test_encodings_by_hand():
    df = pd.DataFrame({"v": [1.0, 3.0, np.nan, 10.0], "c": ["x", "y", "x", "z"],
                       "t": [0, 1, 1, 0], "split": ["train", "train", "train", "val"]})
    dm = make(df, tasks={"t": "binary"})
    # mean of (1, 3) = 2 (the NaN is left out), std 1; the NaN becomes the mean, 0.
    x = dm.tensors["train"]["x"]
    assert x.tolist() == [[-1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    assert dm.tensors["val"]["x"].tolist() == [[8.0, 0.0, 0.0]]  # "z" unseen
    emb = make(df, tasks={"t": "binary"}, categorical_encoding="embedding")
    assert emb.tensors["train"]["x"].tolist() == [[-1.0], [1.0], [0.0]]
    assert emb.tensors["train"]["x_cat"].tolist() == [[1], [2], [1]]  # 0 = unknown
    assert emb.tensors["val"]["x_cat"].tolist() == [[0]]
    assert emb.net_kwargs() == {"encoder": "tabular", "in_channels": 1, "cardinalities": [3],
                                "tasks": {"t": 1}}
    raw = make(df, tasks={"t": "binary"}, standardize=False)
    assert raw.tensors["train"]["x"][:, 0].tolist() == [1.0, 3.0, 2.0]


def test_labels_masks_and_task_kwargs():
    df = frame()
    df.loc[3, "click"] = np.nan
    df.loc[5, "kind_label"] = None
    dm = make(df)
    t = dm.tensors["train"]
    assert not t["mask"]["click"][3] and t["mask"]["click"].sum() == 19
    assert not t["mask"]["kind"][5] and t["mask"]["spend"].all()
    classes = dm.stats["classes"]["kind"]
    ref = [classes.index(v) for v in df.kind_label[:20] if isinstance(v, str)]
    assert t["y"]["kind"][t["mask"]["kind"]].tolist() == ref
    assert dm.task_kwargs() == {"tasks": {"click": "binary", "spend": "regression",
                                          "kind": {"type": "multiclass", "num_classes": 3}}}
    assert dm.net_kwargs()["tasks"] == {"click": 1, "spend": 1, "kind": 3}


@pytest.mark.parametrize("change,match", [
    (lambda df: df.__setitem__("click", df.click.where(df.index != 25, 2.0)),
     "task 'click' \\(column 'click', val rows\\) is binary: labels must be 0 or 1, got 2.0"),
    (lambda df: df.__setitem__("kind_label", df.kind_label.where(df.index != 35, "zzz")),
     "task 'kind' \\(column 'kind_label', test rows\\): class 'zzz' is not among the "
     "training classes"),
    (lambda df: df.__setitem__("spend", df.spend.where(df.index != 1, np.inf)),
     "task 'spend' \\(column 'spend', train rows\\): regression labels must be finite"),
    (lambda df: df.__setitem__("click", ["yes"] * len(df)),
     "task 'click' \\(column 'click', train rows\\): labels must be numbers"),
])
def test_bad_labels_name_the_task_column_and_split(change, match):
    df = frame()
    change(df)
    with pytest.raises(ValueError, match=match):
        make(df)


def test_multiclass_with_num_classes_checks_the_range():
    df = frame()
    df["kind_label"] = np.arange(len(df)) % 3
    dm = make(df, tasks={"kind": {"type": "multiclass", "column": "kind_label",
                                  "num_classes": 3}})
    assert dm.net_kwargs()["tasks"] == {"kind": 3}
    df.loc[30, "kind_label"] = 3
    with pytest.raises(ValueError, match="task 'kind' .* multiclass with 3 classes: labels must "
                                         "be integers in \\[0, 2\\], got 3"):
        make(df, tasks={"kind": {"type": "multiclass", "column": "kind_label",
                                 "num_classes": 3}})


def test_bad_configuration():
    df = frame()
    with pytest.raises(ValueError, match="exactly one of 'path'"):
        TabularMultiTaskDataModule(tasks=TASKS)
    with pytest.raises(ValueError, match="'categorical_encoding' must be one of"):
        TabularMultiTaskDataModule(frames=df, tasks=TASKS, categorical_encoding="hash")
    with pytest.raises(ValueError, match="task 'click': type must be one of"):
        TabularMultiTaskDataModule(frames=df, tasks={"click": "ranking"})
    with pytest.raises(ValueError, match="label column 'nope' not in the table"):
        make(df, tasks={"click": {"type": "binary", "column": "nope"}})
    with pytest.raises(ValueError, match="numeric column 'city' holds non-numbers"):
        make(df, numeric=["age", "city"], categorical=[])
    with pytest.raises(ValueError, match="split column 'split' must hold train/val/test"):
        make(df.assign(split="dev"))
    with pytest.raises(ValueError, match="'metric' must be one of"):
        TabularMultiTaskDataModule(frames=df, tasks=TASKS, metric="auc")


def test_random_split_files_and_batches(tmp_path):
    df = frame(100).drop(columns="split")
    df["user"] = np.arange(100) % 7
    path = tmp_path / "table.csv"
    df.to_csv(path, index=False)
    dm = TabularMultiTaskDataModule(path=str(path), tasks=TASKS, group_column="user",
                                    val_ratio=0.2, test_ratio=0.1, batch_size=16, seed=3)
    dm.setup()
    sizes = {s: dm.tensors[s]["x"].size(0) for s in ("train", "val", "test")}
    assert sizes == {"train": 70, "val": 20, "test": 10}
    assert "user" not in dm.stats["numeric"]  # the group column is no feature
    batches = list(dm.train_dataloader())
    assert sum(b["inputs"]["x"].size(0) for b in batches) == 70
    assert set(batches[0]) == {"inputs", "y", "mask", "group"}
    again = TabularMultiTaskDataModule(path=str(path), tasks=TASKS, group_column="user",
                                       val_ratio=0.2, test_ratio=0.1, seed=3)
    again.setup()
    assert torch.equal(again.tensors["test"]["x"], dm.tensors["test"]["x"])
    with pytest.raises(FileNotFoundError, match="not found"):
        read_table(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="unknown table format"):
        (tmp_path / "t.xlsx").write_text("")
        read_table(tmp_path / "t.xlsx")


def test_parquet_file(tmp_path):
    pytest.importorskip("pyarrow")
    df = frame()
    df.to_parquet(tmp_path / "t.parquet")
    dm = make(None, frames=None, path=str(tmp_path / "t.parquet"))
    assert torch.equal(dm.tensors["train"]["x"], make(df).tensors["train"]["x"])


def test_last_training_batch_of_one_row_is_dropped():
    df = frame(40)
    df["split"] = ["train"] * 17 + ["val"] * 23
    dm = make(df, batch_size=8)
    sizes = [b["inputs"]["x"].size(0) for b in dm.train_dataloader()]
    assert sorted(sizes) == [8, 8]  # 17 = 8 + 8 + 1: the single row is left out this epoch
    assert [b["inputs"]["x"].size(0) for b in dm.val_dataloader()] == [8, 8, 7]


def test_short_fit_with_embeddings_logs_mean_metrics():
    from functools import partial

    import lightning as L

    from moegraph.nn import HoME
    from moegraph.nn.models import multitask_net
    from moegraph.tasks import MultiTaskLearning

    torch.manual_seed(0)
    dm = make(frame(120), categorical_encoding="embedding", batch_size=16)
    net = multitask_net(head=partial(HoME, hidden_channels=8), categorical_channels=3,
                        **dm.net_kwargs())
    assert net.head.in_channels == 2 + 3
    task = MultiTaskLearning(net, optimizer=partial(torch.optim.Adam, lr=0.01),
                             **dm.task_kwargs())
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=dm)
    m = trainer.callback_metrics
    assert {"val/mean_auc", "val/mean_score", "val/kind/acc", "val/spend/r2"} <= set(m)
    assert m["val/mean_auc"].item() == pytest.approx(m["val/click/auc"].item())
    ref = (m["val/click/auc"] + m["val/spend/r2"] + m["val/kind/acc"]) / 3
    assert m["val/mean_score"].item() == pytest.approx(ref.item(), abs=1e-5)
