r"""The shared helpers of the study runners and benchmarks (``experiments/_study.py``)."""
import json
import math
import time

import pytest


def test_mean_std_against_hand_values(script):
    study = script("_study")
    # values 0.1, 0.2, 0.3: mean 0.2, sample std sqrt(((0.1)^2 + 0 + (0.1)^2) / 2) = 0.1
    assert study.mean_std([0.1, 0.2, 0.3]) == "20.00 ± 10.00"
    # 1, 2, 3, 4: mean 2.5, sample variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    std = math.sqrt(5 / 3)
    assert study.mean_std([1, 2, 3, 4], scale=1.0, digits=3) == f"2.500 ± {std:.3f}"
    assert study.mean_std([0.5]) == "50.00 ± 0.00"  # one value: no spread
    assert study.mean_std([]) == "–"
    assert study.mean_std([], empty="n/a") == "n/a"


def test_run_pending_skips_cached_runs(script, tmp_path, capsys):
    study = script("_study")
    cached = tmp_path / "a.json"
    cached.write_text(json.dumps({"metric": "acc", "metrics": {"test/acc": 0.5}}))
    calls = []

    def run(path, value):
        calls.append(path.name)
        record = {"metric": "acc", "metrics": {"test/acc": value}}
        path.write_text(json.dumps(record))
        return record

    jobs = [(tmp_path / name, lambda p=tmp_path / name, v=v: run(p, v), name)
            for name, v in (("a.json", 0.1), ("b.json", 0.25), ("c.json", 0.75))]
    assert study.run_pending(jobs, dry_run=True) == ["b.json", "c.json"]
    assert calls == []  # a dry run trains nothing
    assert study.run_pending(jobs) == ["b.json", "c.json"]
    assert calls == ["b.json", "c.json"]
    out = capsys.readouterr().out
    assert "2 runs to do, 1 cached" in out and "test/acc=0.2500" in out
    assert study.run_pending(jobs) == []  # now every run is cached
    assert calls == ["b.json", "c.json"]
    assert json.loads(cached.read_text())["metrics"]["test/acc"] == 0.5  # untouched
    assert [r["metrics"]["test/acc"] for r in study.load_runs(tmp_path)] == [0.5, 0.25, 0.75]


def test_command_line_and_header(script):
    study = script("_study")
    script_path = study.ROOT / "experiments" / "run_x.py"
    command = study.command_line(script_path, ["--seeds", "3", "--table-only", "a b"])
    assert command == "python experiments/run_x.py --seeds 3 'a b'"
    runs = study.RESULTS / "x_runs"
    assert study.results_header("Title", command, runs) == [
        "# Title", "", f"Made by `{command}` (cached runs in `experiments/results/x_runs/`).", ""]
    assert study.results_header("Title", "cmd")[2] == "Made by `cmd`."


def test_timers(script):
    study = script("_study")
    with study.Timer() as t:
        time.sleep(0.02)
    assert 0.02 <= t.seconds < 1.0
    calls = []
    times, out = study.timed(lambda: calls.append(1) or len(calls), repeats=3)
    assert len(times) == 3 and len(calls) == 4 and out == 4  # one warm-up call
    order = []
    medians = study.time_rotated({"a": lambda: order.append("a"),
                                  "b": lambda: order.append("b")}, repeats=2)
    assert order == ["a", "b", "b", "a"] and set(medians) == {"a", "b"}


@pytest.mark.slow
def test_train_cached_runs_and_caches(script, tmp_path):
    r"""One tiny run through ``train(cfg)``: the record holds the overrides,
    the metrics ``train`` returned and what each ``collect`` added."""
    study = script("_study")
    path = tmp_path / "runs" / "tiny.json"
    overrides = ["data.dataset_kwargs.num_nodes=60", "trainer.max_epochs=1", *study.QUIET]
    record = study.train_cached(overrides, {"seed": 0}, path,
                                collect=(study.run_diagnostics, lambda cfg, out: {"x": 1}))
    assert json.loads(path.read_text()) == record
    assert record["overrides"] == overrides and record["seed"] == 0 and record["x"] == 1
    assert record["metric"] == "acc" and "test/acc" in record["metrics"]
    assert record["wall_seconds"] > 0


def test_write_results_keeps_the_hand_written_findings(script, tmp_path):
    study = script("_study")
    path = tmp_path / "study.md"
    # a new file: the generated tables, then the mark for findings
    text = study.write_results(path, "# t\n\n| a |\n|---|\n| 1 |\n")
    assert text == f"# t\n\n| a |\n|---|\n| 1 |\n\n{study.FINDINGS_MARK}\n"
    assert path.read_text() == text
    # findings written by hand below the mark survive a rebuild of the tables
    path.write_text(text + "- GMoE loses on reed98 (by hand).\n")
    study.write_results(path, "# t\n\n| a |\n|---|\n| 2 |")
    assert path.read_text() == (f"# t\n\n| a |\n|---|\n| 2 |\n\n{study.FINDINGS_MARK}\n"
                                "- GMoE loses on reed98 (by hand).\n")
    # a file without the mark (made before it existed) is replaced, the mark added
    path.write_text("old table, no mark\n")
    assert study.write_results(path, "new") == f"new\n\n{study.FINDINGS_MARK}\n"


def test_target_cell_against_hand_values(script):
    study = script("_study")
    gnn = [0.80, 0.82, 0.84]  # mean 0.82, sample std 0.02: half std 1 point
    # +1.0 point: not above by more than one std (2 points), not below: ok
    assert study.target_cell(gnn, [0.81, 0.83, 0.85]) == "+1.0 (ok; half std 1.0)"
    # +3.0 points > one std: a gain
    assert study.target_cell(gnn, [0.83, 0.85, 0.87]) == "+3.0 (gain; half std 1.0)"
    # -1.0 point = minus half a std: still ok (the bound is inclusive)
    assert study.target_cell(gnn, [0.79, 0.81, 0.83]).startswith("-1.0 (ok")
    # -1.5 points: below by more than half a std
    assert study.target_cell(gnn, [0.785, 0.805, 0.825]).startswith("-1.5 (BELOW")
    # fewer than 2 paired seeds, or unpaired lists: not judged
    assert study.target_cell([0.8], [0.9]) == "n = 1: not judged"
    assert study.target_cell(gnn, [0.8, 0.8]) == "n = 2: not judged"


def test_histogram_range_against_hand_values(script):
    study = script("_study")
    # 100 values in 10 bins of 0.1: 5 in the first, 90 in the fifth, 5 in the last.
    # The 5% quantile is reached in bin 0 (5 >= 5), the 95% in bin 4 (95 >= 95).
    counts = [5, 0, 0, 0, 90, 0, 0, 0, 0, 5]
    assert study.histogram_range(counts) == pytest.approx((0.0, 0.5))
    assert study.histogram_range(counts, 0.01, 0.99) == pytest.approx((0.0, 1.0))
    # everything in one bin of 20 (the Mowst histograms): that bin's edges
    one = [0] * 20
    one[0] = 1000
    assert study.histogram_range(one) == pytest.approx((0.0, 0.05))
    a, b = study.histogram_range([0, 0, 0])  # nothing counted
    assert math.isnan(a) and math.isnan(b)


def test_best_overrides_spell_values_as_the_cli_takes_them(script):
    study = script("_study")
    params = {"model.net.gate_features": True, "model.optimizer.lr": 0.1 + 0.2,
              "backbone.hidden_channels": 64, "model.net.gate_type": "entropy",
              "backbone.residual": False}
    assert study.best_overrides(params) == [
        "backbone.hidden_channels=64", "backbone.residual=false",
        "model.net.gate_features=true", "model.net.gate_type=entropy",
        "model.optimizer.lr=0.30000000000000004"]  # exact: the run is the trial's


def test_params_tag_names_a_choice_not_its_order(script):
    study = script("_study")
    a = {"x": 1, "y": 0.5}
    tag = study.params_tag(a)
    assert len(tag) == 8 and int(tag, 16) >= 0
    assert study.params_tag({"y": 0.5, "x": 1}) == tag
    assert study.params_tag({"x": 2, "y": 0.5}) != tag
    assert study.params_tag({"x": 1, "y": 0.5, "z": True}) != tag


@pytest.mark.slow  # 3 tiny trials in 2 CLI processes: about 1 min on a quiet 2-core machine
def test_tune_cached_searches_resumes_and_keeps_the_budget(script, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    study = script("_study")
    db = tmp_path / "tuning" / "tiny__gnn.db"
    overrides = ["debug=fdr", "data.dataset_kwargs.num_nodes=200", "logger=none"]
    first = study.tune_cached(overrides, "gnn", db, 2)
    assert first["trials"] == 2 and 0.0 <= first["value"] <= 1.0
    assert 1e-3 <= first["params"]["model.optimizer.lr"] <= 5e-2  # gnn.yaml's interval
    assert first["params"]["backbone.hidden_channels"] in (32, 64, 128, 256)
    # resumed: one more trial, and not a repeat of the first proposal
    more = study.tune_cached(overrides, "gnn", db, 3)
    import optuna
    trials = optuna.load_study(study_name="tiny__gnn", storage=f"sqlite:///{db}").trials
    assert more["trials"] == 3 and len(trials) == 3
    assert trials[2].params != trials[0].params
    # a smaller budget reads only the first trials: nothing runs, best of those
    again = study.tune_cached(overrides, "gnn", db, 2)
    assert again["trials"] == 2
    assert again["value"] == max(t.value for t in trials[:2])


def test_tuned_table_reads_only_the_runs_of_the_current_choice(script, tmp_path):
    nc = script("run_node_classification")
    chosen, stale = {"backbone.dropout": 0.5}, {"backbone.dropout": 0.1}
    protocol = {"hidden_channels": 64, "num_layers": 2, "residual": False,
                "max_epochs": 300, "lr": 0.01}
    for params, score, seed in ((chosen, 0.6, 0), (chosen, 0.7, 1), (stale, 0.1, 0)):
        record = {"dataset": "reed98", "model": "gnn", "backbone": "gcn", "seed": seed,
                  "tuned": params, "metric": "acc", "metrics": {"test/acc": score},
                  "wall_seconds": 1.0, "protocol": protocol}
        (tmp_path / nc.run_name("reed98", "gnn", "gcn", seed, params)).write_text(
            json.dumps(record))
    assert nc.run_name("reed98", "gnn", "gcn", 0, chosen) != nc.run_name(
        "reed98", "gnn", "gcn", 0, stale)
    summary = {"dataset": "reed98", "model": "gnn", "backbone": "gcn", "params": chosen,
               "value": 0.65, "trials": 20, "seconds": 3.0}
    table = nc.build_table(tmp_path, "cmd", {"reed98__gnn__gcn": summary})
    row = next(line for line in table.splitlines() if line.startswith("| reed98 | gcn |"))
    assert "65.00 ± 7.07" in row  # mean of 0.6, 0.7; sample std 0.0707: the stale run left out
    assert "| reed98 | gnn | gcn | 20 | 65.00 | 3 | `backbone.dropout=0.5` |" in table


def test_t_quantiles_match_scipy(script):
    stats = pytest.importorskip("scipy.stats")
    study = script("_study")
    for df, q in enumerate(study.T_975, 1):
        assert q == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4)


def test_paired_difference_against_hand_values(script):
    study = script("_study")
    # gains a - b on seeds 0..3: 0.02, 0.04, 0.03, 0.03 -> mean 0.03, sample std
    # sqrt((1e-4 + 1e-4 + 0 + 0) / 3) = 0.005774, t = 0.03 / (0.005774 / 2) = 10.39 > 3.182
    a = {0: 0.82, 1: 0.84, 2: 0.83, 3: 0.83, 7: 0.9}  # seed 7: not in b, ignored
    b = {0: 0.80, 1: 0.80, 2: 0.80, 3: 0.80}
    d = study.paired_difference(a, b)
    assert d["n"] == 4 and d["wins"] == 4 and d["verdict"] == ">"
    assert d["mean"] == pytest.approx(0.03) and d["std"] == pytest.approx(math.sqrt(2e-4 / 3))
    assert d["t"] == pytest.approx(0.03 / (math.sqrt(2e-4 / 3) / 2))
    # the other way round: worse beyond noise
    assert study.paired_difference(b, a)["verdict"] == "<"
    # lower is better (e.g. RMSE): a's larger values are a loss
    d = study.paired_difference(a, b, higher_is_better=False)
    assert d["mean"] == pytest.approx(-0.03) and d["wins"] == 0 and d["verdict"] == "<"
    # gains 0.01, -0.01, 0.02: mean 0.00667, std 0.01528, t = 0.756 < 4.303: within noise
    d = study.paired_difference({0: 1.01, 1: 0.99, 2: 1.02}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert d["verdict"] == "~" and d["wins"] == 2
    assert d["t"] == pytest.approx((0.02 / 3) / (math.sqrt(7e-4 / 3) / math.sqrt(3)))
    # a consistent gain on 3 seeds, t below the 5% threshold 4.303 at 2 df: within noise
    # (gains 0.03, 0.01, 0.02 -> mean 0.02, std 0.01, t = 0.02 / (0.01 / sqrt 3) = 3.46)
    d = study.paired_difference({0: 0.03, 1: 0.01, 2: 0.02}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert d["t"] == pytest.approx(0.02 / (0.01 / math.sqrt(3))) and d["verdict"] == "~"
    # one seed, or identical gains: no spread, no verdict beyond noise
    assert study.paired_difference({0: 0.9}, {0: 0.1})["verdict"] == "~"
    assert study.paired_difference({0: 0.5, 1: 0.75}, {0: 0.25, 1: 0.5})["verdict"] == "~"
    assert study.paired_difference({0: 0.5}, {1: 0.5}) is None


@pytest.mark.parametrize("dataset", ["cora", "tolokers"])
def test_mowst_pretrains_as_the_datasets_gnn_runs(script, dataset):
    r"""The study's Mowst runs pre-train their GNN with the budget, patience and
    minimum gain of the dataset's ``model=gnn`` runs (tolokers departs from
    the 300 epochs / patience 50 of ``conf/model/mowst.yaml``)."""
    from hydra.core.hydra_config import HydraConfig

    from moegraph.train import compose_config

    nc = script("run_node_classification")
    try:
        gnn = compose_config(nc.overrides_for(dataset, "gnn", "gcn", 0))
        mowst = compose_config(nc.overrides_for(dataset, "mowst", "gcn", 0))
    finally:
        HydraConfig.instance().cfg = None
    assert mowst.model.pretrain_strong_epochs == gnn.trainer.max_epochs
    assert mowst.model.pretrain_weak_epochs == gnn.trainer.max_epochs
    assert mowst.model.pretrain_patience == gnn.callbacks.early_stopping.patience
    assert mowst.model.pretrain_min_delta == gnn.callbacks.early_stopping.get("min_delta", 0.0)
    assert (gnn.trainer.max_epochs, gnn.callbacks.early_stopping.patience) == (
        (150, 30) if dataset == "tolokers" else (300, 50))
    assert mowst.trainer.max_epochs > gnn.trainer.max_epochs  # the schedule's own stop


def test_graph_moe_cache_keys_are_those_of_the_cached_runs(script):
    r"""The graph-MoE study's cached runs stay valid while the configs they
    ran with are unchanged, including when a new option is added switched
    off (e.g. ``shared_expert: false`` in ``conf/model/gmoe.yaml``): the hash
    of each (dataset, model) is one in the cached file names (a cell whose
    default changed holds the runs of both configs, each under its hash)."""
    script("run_node_classification")  # imported by run_graph_moe as a sibling script
    study = script("run_graph_moe")
    runs = study.RESULTS / "graph_moe_runs_v2"
    cached: dict[str, set[str]] = {}
    for name in (p.name for p in runs.glob("*__seed0__*.json")):
        key, digest = name.rsplit("__", 1)
        cached.setdefault(key.replace("__seed0", ""), set()).add(digest[:-5])
    checked = 0
    for dataset in ("cora", "minesweeper"):
        for model in ("gnn", "gmoe", "dense_gnn", "moe_gnn"):
            key = f"{dataset}__{model}"
            assert study.config_hash(dataset, model) in cached[key], key
            checked += 1
    assert checked == 8
    # ffn_scale: the ReZero default is hashed, null (no scale) is left out, so the
    # runs made before the key existed keep their hash
    for model in ("dense_gnn", "moe_gnn"):
        unscaled = study.config_hash("cora", model, ("model.net.ffn_scale=null",))
        assert unscaled != study.config_hash("cora", model)
        assert unscaled in cached[f"cora__{model}"]


def test_load_or_tune_searches_only_the_cells_short_of_the_budget(script, tmp_path, capsys):
    study = script("_study")
    folder = tmp_path / "tuning"
    folder.mkdir()
    (folder / "a__gnn.json").write_text(json.dumps({"trials": 20, "params": {"x": 1}}))
    (folder / "b__gnn.json").write_text(json.dumps({"trials": 5, "params": {"x": 2}}))
    calls = []

    def tune(name):
        def run():
            calls.append(name)
            return {"trials": 20, "params": {"x": name}}
        return run

    cells = [(n, tune(n)) for n in ("a__gnn", "b__gnn", "c__gnn")]
    # a dry run lists the cells to search and searches nothing
    listed = study.load_or_tune(cells, folder, 20, dry_run=True)
    assert calls == [] and listed["b__gnn"]["trials"] == 5
    assert "c__gnn: 20 trials (0 done)" in capsys.readouterr().out
    # table only: what is on disk
    assert set(study.load_or_tune(cells, folder, 20, search=False)) == {"a__gnn", "b__gnn"}
    tuned = study.load_or_tune(cells, folder, 20)
    assert calls == ["b__gnn", "c__gnn"]  # a__gnn has its 20 trials
    assert tuned["a__gnn"]["params"] == {"x": 1} and tuned["c__gnn"]["params"] == {"x": "c__gnn"}


def test_graph_moe_tuned_table_reads_only_the_runs_of_the_current_choice(script, tmp_path):
    script("run_node_classification")  # imported by run_graph_moe as a sibling script
    gm = script("run_graph_moe")
    chosen, stale = {"backbone.dropout": 0.5}, {"backbone.dropout": 0.1}
    for params, score, seed in ((chosen, 0.6, 0), (chosen, 0.7, 1), (stale, 0.1, 0)):
        record = {"dataset": "reed98", "model": "gnn", "seed": seed, "tuned": params,
                  "metric": "acc", "metrics": {"test/acc": score}, "wall_seconds": 1.0}
        (tmp_path / gm.run_name("reed98", "gnn", seed, params)).write_text(json.dumps(record))
    assert gm.run_name("reed98", "gnn", 0, chosen) != gm.run_name("reed98", "gnn", 0, stale)
    assert gm.run_name("reed98", "gnn", 0) != gm.run_name("reed98", "gnn", 0, chosen)
    dense = {"backbone.num_layers": 3}  # a row needs a model beside the GCN
    record = {"dataset": "reed98", "model": "dense_gnn", "seed": 0, "tuned": dense,
              "metric": "acc", "metrics": {"test/acc": 0.5}, "wall_seconds": 2.0}
    (tmp_path / gm.run_name("reed98", "dense_gnn", 0, dense)).write_text(json.dumps(record))
    summary = {"dataset": "reed98", "model": "gnn", "params": chosen, "value": 0.65,
               "trials": 20, "seconds": 3.0}
    dense_summary = {**summary, "model": "dense_gnn", "params": dense}
    table = gm.build_table(tmp_path, "cmd", tuned={"reed98__gnn": summary,
                                                   "reed98__dense_gnn": dense_summary})
    row = next(line for line in table.splitlines() if line.startswith("| reed98 | 6"))
    assert row.startswith("| reed98 | 65.00 ± 7.07 |")  # the stale run left out
    assert "| 50.00 ± 0.00 |" in row and "| 2 / 0 / 1 / 0 |" in row
    assert "| reed98 | gnn | 20 | 65.00 | 3 | `backbone.dropout=0.5` |" in table
    assert "Tuned: each model runs its chosen configuration" in table


def test_molhiv_table_keeps_one_protocol(script, tmp_path):
    r"""Runs of two protocols in one cache: the table of each protocol counts its
    own runs only, and a protocol other than the default gets its own results file."""
    molhiv = script("run_molhiv")
    default = dict(molhiv.PROTOCOL)
    longer = {**default, "epochs": 10, "subset": 1.0}
    for protocol, score in ((default, 0.6), (longer, 0.8)):
        tag = molhiv.protocol_tag(protocol)
        for seed in range(2):
            record = {"arm": "gin_node", "seed": seed, "protocol_tag": tag,
                      "wall_seconds": 1.0,
                      "metrics": {"val/rocauc": score, "test/rocauc": score + 0.01 * seed}}
            (tmp_path / f"gin_node__{tag}__seed{seed}.json").write_text(json.dumps(record))
    table = molhiv.build_table(tmp_path, "cmd", molhiv.protocol_tag(longer))
    row = next(line for line in table.splitlines() if line.startswith("| gin_node |"))
    # test scores 0.80 and 0.81: mean 80.50, std sqrt(2 * 0.005^2) = 0.0071 -> 0.71
    assert row.startswith("| gin_node | 2 | 80.00 ± 0.00 | 80.50 ± 0.71 |")
    assert molhiv.results_name(default) == "molhiv.md"
    assert molhiv.results_name(longer) == (
        "molhiv__hidden64_layers3_epochs10_subset1.0_batch_size64_lr0.005.md")


def test_tuned_study_arguments(script, tmp_path):
    r"""``--tune N`` moves the default cache to the tuned one, keeps a cache the
    user gave, and refuses a negative budget."""
    import argparse

    study = script("_study")
    runs, tuning, tuned = tmp_path / "runs", tmp_path / "tuning", tmp_path / "tuned"

    def parse(argv):
        parser = argparse.ArgumentParser()
        return study.add_tuned_study_arguments(parser, runs, tuning, tuned, "cell")(argv)

    args = parse([])
    assert (args.tune, args.seeds, args.runs, args.tuning) == (0, None, runs, tuning)
    assert parse(["--tune", "20", "--seeds", "3"]).runs == tuned
    mine = tmp_path / "mine"
    assert parse(["--tune", "20", "--runs", str(mine)]).runs == mine
    with pytest.raises(SystemExit):
        parse(["--tune", "-1"])


def test_set_study_overrides_every_model_and_pairs_mowst_with_its_gnn(script):
    r"""``--set`` adds its overrides to every run after the protocol's (so they
    win), and Mowst pre-trains its GNN with the budget the set gives the
    ``model=gnn`` runs, its own schedule still deciding when to stop."""
    from hydra.core.hydra_config import HydraConfig

    from moegraph.train import compose_config

    nc = script("run_node_classification")
    fixed = ("backbone.hidden_channels=128", "backbone.num_layers=4", "trainer.max_epochs=200")
    try:
        gnn = compose_config(nc.overrides_for("minesweeper", "gnn", "sage", 3, fixed))
        mowst = compose_config(nc.overrides_for("minesweeper", "mowst", "sage", 3, fixed))
        mlp = compose_config(nc.overrides_for("minesweeper", "mlp", "none", 3, fixed))
    finally:
        HydraConfig.instance().cfg = None
    for cfg in (gnn, mowst, mlp):
        assert (cfg.backbone.hidden_channels, cfg.backbone.num_layers) == (128, 4)
        assert cfg.data.split == 3 and cfg.seed == 3
    assert gnn.trainer.max_epochs == 200 == mlp.trainer.max_epochs
    assert mowst.model.pretrain_strong_epochs == 200 == mowst.model.pretrain_weak_epochs
    assert mowst.trainer.max_epochs == 2000


def test_set_study_arguments_cache_and_table(script, tmp_path):
    r"""``--set``: a malformed, repeated or per-run key is a usage error, it
    excludes ``--tune``; its runs are named after the overrides and its table
    reads only them, naming the overrides."""
    import argparse

    study = script("_study")
    nc = script("run_node_classification")
    parser = argparse.ArgumentParser()
    assert study.parse_set(parser, ["backbone.num_layers=4", "a.b=x=y"]) == {
        "backbone.num_layers": "4", "a.b": "x=y"}
    for bad in (["backbone.num_layers"], ["=4"], ["a=1", "a=2"], ["data.split=2"],
                ["model/strong=gin"], ["+trainer.x=1"]):
        with pytest.raises(SystemExit):
            study.parse_set(parser, bad)
    with pytest.raises(SystemExit):
        nc.main(["--tune", "2", "--set", "backbone.num_layers=4", "--dry-run"])

    fixed = {"backbone.num_layers": "4"}
    protocol = {"hidden_channels": 64, "num_layers": 4, "residual": True,
                "max_epochs": 300, "lr": 0.003, "patience": 300}
    for params, score, seed in ((fixed, 0.9, 0), (fixed, 0.8, 1), (None, 0.1, 0)):
        record = {"dataset": "minesweeper", "model": "gnn", "backbone": "sage", "seed": seed,
                  "metric": "auroc", "metrics": {"test/auroc": score}, "wall_seconds": 1.0,
                  "protocol": protocol, **({"set": params} if params else {})}
        (tmp_path / nc.run_name("minesweeper", "gnn", "sage", seed, None, params)).write_text(
            json.dumps(record))
    assert len(list(tmp_path.glob("*.json"))) == 3  # the set's runs do not overwrite
    table = nc.build_table(tmp_path, "cmd", fixed=fixed)
    row = next(line for line in table.splitlines() if line.startswith("| minesweeper | sage"))
    assert "85.00 ± 7.07" in row  # the run without the set left out
    assert "`backbone.num_layers=4`" in table
    assert "| minesweeper | 64 | 4 | yes | 300 | 300 | 0.003 |" in table  # protocol row
    assert "Mowst against its GNN" not in table  # no Mowst runs: no verdict table
    plain = nc.build_table(tmp_path, "cmd")
    row = next(line for line in plain.splitlines() if line.startswith("| minesweeper | sage"))
    assert "10.00" in row and "85.00" not in row


def test_patience_text_reads_the_record_or_composes_its_overrides(script):
    r"""The protocol table's patience: the record's own, else that of the
    config of the record's overrides (records from before it was kept),
    else unknown."""
    nc = script("run_node_classification")
    assert nc.patience_text({"protocol": {"patience": 50}}) == "50"
    assert nc.patience_text({"protocol": {"patience": None}}) == "none"
    assert nc.patience_text({"protocol": {}}) == "–"
    old = {"protocol": {}, "overrides": nc.overrides_for("tolokers", "gnn", "gcn", 1)}
    assert nc.patience_text(old) == "30"  # experiment/nc_tolokers.yaml
    old["overrides"].append("callbacks.early_stopping.patience=7")
    assert nc.patience_text(old) == "7"


def test_set_arguments_move_the_default_cache(script, tmp_path):
    r"""``--set`` (where a study offers it) gives ``args.fixed`` and moves the
    default cache to the set's; a cache the user gave is kept; a study
    without it has ``args.fixed == {}``."""
    import argparse

    study = script("_study")
    runs, tuning, tuned, fixed = (tmp_path / n for n in ("runs", "tuning", "tuned", "fixed"))

    def parse(argv, set_runs=fixed):
        parser = argparse.ArgumentParser()
        return study.add_tuned_study_arguments(parser, runs, tuning, tuned, "cell",
                                               set_runs, "t.md")(argv)

    args = parse(["--set", "trainer.max_epochs=300"])
    assert args.fixed == {"trainer.max_epochs": "300"} and args.runs == fixed
    assert parse([]).runs == runs and parse([]).fixed == {}
    mine = tmp_path / "mine"
    assert parse(["--set", "a=1", "--runs", str(mine)]).runs == mine
    with pytest.raises(SystemExit):
        parse(["--set", "a=1", "--tune", "3"])
    assert parse([], set_runs=None).fixed == {}
    with pytest.raises(SystemExit):
        parse(["--set", "a=1"], set_runs=None)  # no such option there


def test_composed_clears_hydra_config_also_on_error(script):
    from hydra.core.hydra_config import HydraConfig

    study = script("_study")
    with study.composed(["experiment=nc_cora", "trainer.max_epochs=7"]) as cfg:
        assert cfg.trainer.max_epochs == 7 and HydraConfig.initialized()
    assert not HydraConfig.initialized()
    with pytest.raises(RuntimeError), study.composed(["experiment=nc_cora"]):
        raise RuntimeError("inside")
    assert not HydraConfig.initialized()


def test_reuse_run_copies_only_a_run_of_the_same_config(script, tmp_path):
    r"""A run another study made is reused when its overrides compose the same
    config, in any order; a different config or a missing file is not."""
    study = script("_study")
    ours = ["experiment=nc_cora", "seed=1", "model=gnn", "trainer.max_epochs=7"]
    same = tmp_path / "same.json"
    same.write_text(json.dumps({"overrides": list(reversed(ours)), "metric": "acc",
                                "metrics": {"test/acc": 0.5}, "model": "old"}))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"overrides": [*ours, "trainer.max_epochs=8"],
                                 "metrics": {"test/acc": 0.9}}))
    out = tmp_path / "out" / "copy.json"
    assert study.reuse_run(ours, {"model": "gnn"}, out, [tmp_path / "missing.json", other]) is None
    assert not out.exists()
    record = study.reuse_run(ours, {"model": "gnn"}, out, [other, same])
    assert record == json.loads(out.read_text())
    assert record["metrics"] == {"test/acc": 0.5} and record["model"] == "gnn"
    assert record["overrides"] == ours and record["reused_from"].endswith("same.json")


def test_graph_moe_set_study_names_reuses_and_tables_its_runs(script, tmp_path, monkeypatch):
    r"""The graph-MoE study's ``--set``: runs tagged with the overrides (the
    config hash composed with them), the GCN run of the node-classification
    study with that config copied rather than trained, and a table of the
    set's runs only, naming the overrides."""
    script("run_node_classification")  # imported by run_graph_moe as a sibling script
    gm = script("run_graph_moe")
    fixed = {"trainer.max_epochs": "300"}
    assert gm.run_name("tolokers", "gmoe", 0, None, fixed) != gm.run_name("tolokers", "gmoe", 0)
    assert gm.config_hash("tolokers", "gmoe", ("trainer.max_epochs=300",)) != gm.config_hash(
        "tolokers", "gmoe")
    assert gm.run_name("tolokers", "gmoe", 0, None, fixed).endswith("__s60c82cb8.json")

    def no_training(*args, **kwargs):
        raise AssertionError("trained a run it could reuse")

    monkeypatch.setattr(gm, "train_cached", no_training)
    record = gm.run_one("tolokers", "gnn", 0, tmp_path, None, fixed)  # committed study run
    assert record["set"] == fixed and record["model"] == "gnn"
    assert record["reused_from"] == (
        "experiments/results/node_classification_runs_set/tolokers__gnn__gcn__s60c82cb8__seed0.json")
    assert (tmp_path / gm.run_name("tolokers", "gnn", 0, None, fixed)).exists()

    monkeypatch.setattr(gm, "RESULTS", tmp_path)  # the tables' load plot: not in the repo
    for model, score in (("gmoe", 0.9), ("gnn", 0.1)):  # a run outside the set: left out
        plain = {"dataset": "tolokers", "model": model, "seed": 1, "metric": "auroc",
                 "metrics": {"test/auroc": score}, "wall_seconds": 1.0}
        (tmp_path / gm.run_name("tolokers", model, 1)).write_text(json.dumps(plain))
    gmoe = {"dataset": "tolokers", "model": "gmoe", "seed": 0, "metric": "auroc", "set": fixed,
            "metrics": {"test/auroc": 0.5}, "wall_seconds": 1.0}
    (tmp_path / gm.run_name("tolokers", "gmoe", 0, None, fixed)).write_text(json.dumps(gmoe))
    table = gm.build_table(tmp_path, "cmd", fixed=fixed)
    row = next(line for line in table.splitlines() if line.startswith("| tolokers | 8"))
    assert "| 50.00 ± 0.00 |" in row and "| 1 / 1 / 0 / 0 |" in row
    # every cached seed counts, however many a call asked for: seed 12 too
    (tmp_path / gm.run_name("tolokers", "gmoe", 12, None, fixed)).write_text(
        json.dumps({**gmoe, "seed": 12, "metrics": {"test/auroc": 0.7}}))
    assert [p.name.split("__")[2] for p in gm.cached_runs(tmp_path, "tolokers", "gmoe", None,
                                                         fixed)] == ["seed0", "seed12"]
    table = gm.build_table(tmp_path, "cmd", fixed=fixed)
    row = next(line for line in table.splitlines() if line.startswith("| tolokers | 8"))
    assert "| 60.00 ± 14.14 |" in row and "| 1 / 2 / 0 / 0 |" in row
    assert "`trainer.max_epochs=300`" in table
    assert "node_classification_runs_set/`" in table  # the reused run is named


def test_graph_moe_set_of_a_key_only_some_models_have(script, tmp_path, monkeypatch):
    r"""``--set model.net.conv=sage`` fits the MoE models (their net has
    ``conv``) and not GCN's (``model/strong``): the table shows the set's
    MoE runs and no GCN cell, instead of failing to compose GCN's config."""
    script("run_node_classification")
    gm = script("run_graph_moe")
    fixed = {"model.net.conv": "sage"}
    monkeypatch.setattr(gm, "RESULTS", tmp_path)  # the tables' load plot: not in the repo
    moe = {"dataset": "minesweeper", "model": "moe_gnn", "seed": 0, "metric": "auroc",
           "set": fixed, "metrics": {"test/auroc": 0.94}, "wall_seconds": 1.0}
    (tmp_path / gm.run_name("minesweeper", "moe_gnn", 0, None, fixed)).write_text(
        json.dumps(moe))
    table = gm.build_table(tmp_path, "cmd", fixed=fixed)
    row = next(line for line in table.splitlines() if line.startswith("| minesweeper |"))
    assert "| 94.00 ± 0.00 |" in row and "| 0 / 0 / 0 / 1 |" in row
    # a key that fits no model is an error, not an empty table
    with pytest.raises(Exception, match="conv2"):
        gm.build_table(tmp_path, "cmd", fixed={"model.net.conv2": "sage"})


def test_graph_moe_set_that_does_not_fit_a_named_model_is_a_usage_error(script, capsys):
    r"""``--set`` with a key that one of ``--models`` lacks (GCN has no
    feed-forward part) stops before any run, naming the model."""
    script("run_node_classification")  # imported by run_graph_moe as a sibling script
    gm = script("run_graph_moe")
    with pytest.raises(SystemExit) as stop:
        gm.main(["--set", "model.net.ffn_scale=0.0", "--datasets", "cora",
                 "--models", "moe_gnn", "gnn", "--dry-run"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "does not fit model=gnn on cora" in err and "leave gnn out of --models" in err


def test_load_or_tune_sets_aside_a_search_of_another_config(script, tmp_path, capsys):
    r"""A default changed after a search: its trials searched another model,
    so the search is neither read nor resumed (the SQLite study moves with
    it), and the cell is searched again."""
    study = script("_study")
    folder = tmp_path / "tuning"
    folder.mkdir()
    for name, config in (("a__moe", "old"), ("b__gnn", "cur"), ("c__moe", None)):
        record = {"trials": 20, "params": {"x": name}}
        if config is not None:
            record["config"] = config
        (folder / f"{name}.json").write_text(json.dumps(record))
        (folder / f"{name}.db").write_text("trials")
    calls = []

    def tune(name):
        def run():
            assert not (folder / f"{name}.db").exists()  # never resumed
            calls.append(name)
            return {"trials": 20, "params": {"x": "new"}, "config": "cur"}
        return run

    names = ("a__moe", "b__gnn", "c__moe")
    cells = [(n, tune(n)) for n in names]
    configs = dict.fromkeys(names, "cur")
    # table only / dry run: the stale searches are left out, and left where they are
    assert set(study.load_or_tune(cells, folder, 20, search=False, configs=configs)) == {
        "b__gnn"}
    assert set(study.load_or_tune(cells, folder, 20, dry_run=True, configs=configs)) == {
        "b__gnn"}
    assert calls == [] and (folder / "a__moe.db").exists()
    assert "a__moe: stale search (config old, now cur)" in capsys.readouterr().out
    tuned = study.load_or_tune(cells, folder, 20, configs=configs)
    assert calls == ["a__moe", "c__moe"]
    assert tuned["b__gnn"]["params"] == {"x": "b__gnn"}
    assert tuned["a__moe"]["params"] == {"x": "new"}
    for name, config in (("a__moe", "old"), ("c__moe", "unrecorded")):
        moved = folder / "stale" / f"{name}__{config}"
        assert json.loads((moved / f"{name}.json").read_text())["params"] == {"x": name}
        assert (moved / f"{name}.db").read_text() == "trials"
    assert "moved to" in capsys.readouterr().out
