r"""``experiments/summarize_runs.py`` on a small fake multirun folder."""
import json

import pytest
import yaml


def fake_run(folder, overrides, config, metrics):
    folder.mkdir(parents=True)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / "metrics.json").write_text(json.dumps({"metrics": metrics, "config": config}))


@pytest.fixture
def sweep(tmp_path):
    r"""Mowst and GMoE on Cora, seeds 0 and 1, and GMoE with 8 experts on
    seed 0: the task name is ``train`` for all (the old grouping merged them)."""
    runs = [(["model=mowst", "seed=0"], 0.80), (["model=mowst", "seed=1"], 0.82),
            (["model=gmoe", "seed=0"], 0.70), (["model=gmoe", "seed=1"], 0.74),
            (["model=gmoe", "+model.net.num_experts=8", "seed=0"], 0.60)]
    for i, (overrides, acc) in enumerate(runs):
        seed = int(overrides[-1].split("=")[1])
        config = {"task_name": "train", "seed": seed,
                  "paths": {"output_dir": str(tmp_path / str(i))}}
        fake_run(tmp_path / str(i), overrides, config,
                 {"test/acc": acc, "time/fit_seconds": 10.0 + i})
    return tmp_path


def test_groups_by_every_differing_override(script, sweep):
    summarize = script("summarize_runs")
    groups = summarize.group_runs(summarize.find_runs(sweep))
    assert {k: sorted(r["metrics"]["test/acc"] for r in v) for k, v in groups.items()} == {
        "model=mowst model.net.num_experts=default": [0.80, 0.82],
        "model=gmoe model.net.num_experts=default": [0.70, 0.74],
        "model=gmoe model.net.num_experts=8": [0.60],
    }


def test_table(script, sweep, tmp_path, capsys):
    summarize = script("summarize_runs")
    out = tmp_path / "table.md"
    summarize.main([str(sweep), "--metrics", "test/acc", "--out", str(out)])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.read_text().splitlines()
            if line.startswith("| model=")}
    # Mowst: mean 81, sample std sqrt(2 * 1^2 / 1) = 1.41; GMoE: 72 ± 2.83 (percent);
    # Mowst's fit times 10 and 11 s: 10.5 ± 0.71
    mowst = rows["model=mowst model.net.num_experts=default"]
    assert "| 0,1 | 81.00 ± 1.41 | 10.50 ± 0.71 |" in mowst
    assert "| 0,1 | 72.00 ± 2.83 |" in rows["model=gmoe model.net.num_experts=default"]
    assert "| 0 | 60.00 ± 0.00 |" in rows["model=gmoe model.net.num_experts=8"]
    assert out.read_text().startswith(f"# Runs under {sweep}\n\nMade by `python ")


def test_averaging_over_more_keys_and_config_fallback(script, tmp_path):
    summarize = script("summarize_runs")
    for i, (split, model) in enumerate([(0, "a"), (1, "a"), (0, "b")]):
        folder = tmp_path / str(i)
        folder.mkdir()
        config = {"seed": split, "data": {"split": split}, "model": {"name": model},
                  "paths": {"output_dir": str(folder)}}  # no .hydra/: the config is used
        (folder / "metrics.json").write_text(json.dumps({"metrics": {"test/acc": 0.5},
                                                         "config": config}))
    runs = summarize.find_runs(tmp_path)
    assert set(summarize.group_runs(runs, over=["seed", "data.split"])) == {
        "model.name=a", "model.name=b"}
    assert set(summarize.group_runs(runs)) == {
        "data.split=0 model.name=a", "data.split=1 model.name=a", "data.split=0 model.name=b"}


def test_parse_overrides(script):
    summarize = script("summarize_runs")
    assert summarize.parse_overrides(["a=1", "+b.c=x=y", "++d=2", "~e"]) == {
        "a": "1", "b.c": "x=y", "d": "2", "e": "~"}


def test_no_runs_fails_clearly(script, tmp_path):
    summarize = script("summarize_runs")
    with pytest.raises(SystemExit, match="no metrics.json under"):
        summarize.main([str(tmp_path)])
