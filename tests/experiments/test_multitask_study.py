r"""The tables of ``experiments/run_multitask_study.py`` built from cached run records."""
import math


def record(name, seed, watch, rmse, best, epochs):
    metrics = {"test/watch/auc": watch, "test/rating/rmse": rmse, "best/epoch": best,
               "time/epochs": epochs}
    return {"name": name, "seed": seed, "metrics": metrics}


def test_convergence_table_counts_runs_stopped_before_the_cap(script):
    study = script("run_multitask_study")
    records = {"A": [record("A", 0, 0.8, 1.0, best=4, epochs=10),  # best/epoch is 0-based
                     record("A", 1, 0.8, 1.0, best=9, epochs=10)],
               "B": [record("B", 0, 0.8, 1.0, best=2, epochs=8)]}
    lines = study.convergence(records, max_epochs=10).splitlines()
    assert lines[2] == "| A | 5/10, 10/10 | 10 | 0/2 |"  # both ran into the cap
    assert lines[3] == "| B | 3/8 | 3 | 1/1 |"


def test_paired_table_signs_and_verdicts(script):
    study = script("run_multitask_study")
    # watch AUC gains of a over b: 0.02, 0.04, 0.03 -> mean 0.03, std 0.01,
    # t = 0.03 / (0.01 / sqrt 3) = 5.2 > 4.303 (2 df): better beyond noise.
    # RMSE (lower is better): a is 0.01 higher on every seed but one -> a loss.
    a = [record("a", s, w, r, 0, 1) for s, (w, r) in
         enumerate([(0.82, 1.01), (0.84, 1.01), (0.83, 0.99)])]
    b = [record("b", s, 0.80, 1.0, 0, 1) for s in range(3)]
    table = study.paired_table({"a": a, "b": b}, [("a", "b"), ("a", "missing")])
    lines = table.splitlines()
    assert len(lines) == 3  # the pair with a missing row is left out
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    names = [c for c, _, _ in study.PAIRED]
    row = dict(zip(["pair", *names], cells, strict=True))
    assert row["pair"] == "a vs b"
    assert row["watch AUC"] == "+0.0300 ± 0.0100 (3/3) >"
    std = math.sqrt(((-0.01 + 1 / 300) ** 2 * 2 + (0.01 + 1 / 300) ** 2) / 2)
    assert row["rating RMSE"] == f"{-1 / 300:+.4f} ± {std:.4f} (1/3) ~"
    assert row["like AUC"] == "-"  # no record holds it


def test_every_row_composes_and_monitors_a_logged_metric(script):
    r"""Each row of the MovieLens and synthetic studies is a valid set of
    overrides, and its early stopping and checkpoint watch the same metric,
    one that the task logs (``val/mean_score`` or a task's own)."""
    from hydra import compose, initialize_config_dir

    from moegraph.train import CONFIG_DIR

    study = script("run_multitask_study")
    rows = {**study.ROWS, **{f"syn {k}": v for k, v in study.SYN_ROWS.items()}}
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for name, overrides in rows.items():
            cfg = compose("train", overrides=list(overrides))
            monitor = cfg.callbacks.early_stopping.monitor
            assert monitor == cfg.callbacks.model_checkpoint.monitor, name
            assert monitor == cfg.optimized_metric, name  # an override of it moves both
            tasks = list(cfg.data.get("tasks") or [])
            assert monitor.startswith("val/"), name
            assert (monitor in ("val/mean_score", "val/mean_r2", "val/mean_auc")
                    or monitor.split("/")[1] in tasks), (name, monitor)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=study.ROWS["HoME, checkpoint on watch AUC"])
    assert cfg.callbacks.model_checkpoint.monitor == "val/watch/auc"
    assert cfg.callbacks.early_stopping.monitor == "val/watch/auc"
