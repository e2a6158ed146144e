r"""Data-parallel training on CPU: 2 processes (gloo) launched by Lightning's DDP.

Each test runs ``tests/ddp_job.py`` (or the CLI) in a subprocess, in its own
process group, killed on timeout so that a hanging collective cannot hang the
suite. The model runs with full neighbourhoods (``num_neighbors=[-1, -1]``),
SAGE convolutions and no dropout, so that a node's output does not depend on
the batch it is in: then 2 processes with ``B`` seeds each take the steps of
one process with ``2B`` (DistributedSampler's seed ``r::2`` of the same order).
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
JOB = Path(__file__).with_name("ddp_job.py")
TIMEOUT = 300


def run(command, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the rank it started
        proc.communicate()
        pytest.fail(f"timed out after {TIMEOUT} s (a hanging collective?): {command}")
    assert proc.returncode == 0, stderr[-4000:]
    return stdout, stderr


def job(tmp_path, name, *args, devices=1):
    out = tmp_path / name
    run([sys.executable, str(JOB), str(out), "--devices", str(devices), *args])
    results = [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(devices)]
    assert all(r["world_size"] == devices for r in results)
    return results


def assert_same_params(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


def assert_ranks_agree(results):
    for other in results[1:]:
        assert_same_params(results[0]["params"], other["params"], atol=0.0)


def assert_same_metrics(a, b, keys, tol=1e-5):
    # NaN on both sides agrees: Mowst's headline score is NaN at the end of a
    # turn that is rolled back (the weights are then those of its start).
    for key in keys:
        assert a[key] == pytest.approx(b[key], abs=tol, nan_ok=True), key


# Mowst under DDP stays in the fast suite through the two tests below; its
# step-equality variant is slow (22 s on 2 cores), run by `make test-slow`.
@pytest.mark.parametrize("model", ["moe_gnn", pytest.param("mowst", marks=pytest.mark.slow)])
def test_two_processes_take_the_steps_of_one_with_the_global_batch(tmp_path, model):
    # 120 training seeds: 4 steps of 2 x 15 (DDP) or of 30 (one process) per epoch;
    # Mowst: 4 epochs, one per turn (weak, strong, weak, strong)
    epochs = "4" if model == "mowst" else "2"
    ddp = job(tmp_path, "ddp", "--model", model, "--batch-size", "15", "--epochs", epochs,
              devices=2)
    one = job(tmp_path, "one", "--model", model, "--batch-size", "30", "--epochs", epochs)[0]
    assert_ranks_agree(ddp)
    assert ddp[0]["steps"] == one["steps"] == (16 if model == "mowst" else 8)
    assert_same_params(ddp[0]["params"], one["params"])
    # The logged metrics are those of all processes together: the torchmetrics
    # gather their states, the logged losses are synced (weighted by nodes).
    keys = ["train/acc", "train/loss", "val/acc", "val/loss"]
    if model == "mowst":
        keys += ["val/acc_tau", "val/acc_weak", "val/acc_strong", "val/confidence"]
        assert ddp[0]["schedule"] == pytest.approx(one["schedule"])
    for result in ddp:
        assert_same_metrics(result["metrics"], one["metrics"], keys)


def test_aux_losses_are_averaged_like_the_gradients(tmp_path):
    # Each process's load-balancing and z-losses are computed on its own batch
    # (as in Switch / GShard per device) and DDP averages the gradients: one
    # process accumulating the two per-rank batches of each step does the same.
    ddp = job(tmp_path, "ddp", "--aux", "--batch-size", "15", devices=2)
    one = job(tmp_path, "one", "--aux", "--batch-size", "15", "--emulate-ranks", "2")[0]
    assert_same_params(ddp[0]["params"], one["params"])
    # The logged step value of each aux loss is the mean over the processes.
    steps, micro = ddp[0]["step_log"], one["step_log"]
    assert len(micro) == 2 * len(steps) == 16
    for k, step in enumerate(steps):
        for key in ("train/aux/load_balance", "train/aux/z_loss", "train/aux_loss",
                    "train/loss"):
            mean = (micro[2 * k][key] + micro[2 * k + 1][key]) / 2
            assert step[key] == pytest.approx(mean, rel=1e-5), (k, key)
    assert ddp[0]["metrics"]["train/aux_loss"] > 0


def test_expert_parallel_under_ddp(tmp_path):
    # model.expert_parallel: each process holds 2 of the 4 experts per block;
    # the steps and the gathered state dict are those of one process.
    ddp = job(tmp_path, "ddp", "--expert-parallel", "--batch-size", "15", devices=2)
    one = job(tmp_path, "one", "--batch-size", "30")[0]
    assert_ranks_agree(ddp)
    assert [r["local_experts"] for r in ddp] == [[2, 2], [2, 2]] and one["local_experts"] == []
    assert ddp[0]["params"].keys() == one["params"].keys()
    assert ddp[0]["params"]["ffns.0.experts.weight1"].shape[0] == 4  # full layout
    assert_same_params(ddp[0]["params"], one["params"])
    assert_same_metrics(ddp[0]["metrics"], one["metrics"], ["train/acc", "val/acc", "val/loss"])


@pytest.mark.slow
def test_full_batch_under_ddp(tmp_path):
    # Every process gets the whole graph: the same steps as one process.
    ddp = job(tmp_path, "ddp", "--model", "mowst_star", "--epochs", "3", devices=2)
    one = job(tmp_path, "one", "--model", "mowst_star", "--epochs", "3")[0]
    assert_ranks_agree(ddp)
    assert_same_params(ddp[0]["params"], one["params"])
    assert_same_metrics(ddp[0]["metrics"], one["metrics"], ["train/acc", "val/acc", "val/loss"])


@pytest.mark.parametrize("model", ["mowst", pytest.param("moe_gnn", marks=pytest.mark.slow)])
def test_a_process_without_training_nodes(tmp_path, model):
    # Rank 1's graph has no training node: its loss is a zero that still
    # reaches the trained parameters (Mowst: in the strong turns too), so both
    # processes run the backward pass and its all-reduce. The gradient is half
    # of one process's, which Adam does not see (scale-invariant, up to its eps:
    # 1e-3 after 4 steps of lr 0.02 on the MoE experts' small gradients).
    ddp = job(tmp_path, "ddp", "--model", model, "--empty-rank", "1", "--epochs", "4",
              devices=2)
    one = job(tmp_path, "one", "--model", model, "--epochs", "4")[0]
    assert_ranks_agree(ddp)
    assert_same_params(ddp[0]["params"], one["params"], atol=2e-3)
    keys = ["train/acc", "val/acc"]
    if model == "mowst":  # defined whether or not the last turn was rolled back
        keys += ["val/acc_tau", "val/acc_strong"]
    assert_same_metrics(ddp[0]["metrics"], one["metrics"], keys, tol=1e-4)


@pytest.mark.parametrize("model", ["mowst", pytest.param("moe_gnn", marks=pytest.mark.slow)])
def test_uneven_batches_and_fewer_eval_nodes_than_processes(tmp_path, model):
    # 122 nodes: 61 training seeds (DistributedSampler pads them to 2 x 31:
    # batches of 8, 8, 8, 7) and 1 validation node (rank 1's shard is empty:
    # it runs one empty batch so that both sync the same metrics).
    ddp = job(tmp_path, "ddp", "--model", model, "--num-nodes", "122", "--val-ratio", "0.01",
              "--batch-size", "8", "--epochs", "2", devices=2)
    assert_ranks_agree(ddp)
    assert ddp[0]["steps"] == 8
    metrics = ddp[0]["metrics"]
    # Mowst's headline score is NaN until both experts and the gate have
    # trained (2 epochs do not leave pre-training); its tau score is defined.
    assert metrics["val/acc_tau" if model == "mowst" else "val/acc"] in (0.0, 1.0)
    nan = {k for k, v in metrics.items() if math.isnan(v)}
    assert nan <= ({"train/acc", "val/acc"} if model == "mowst" else set())
    assert nan == {k for k, v in ddp[1]["metrics"].items() if math.isnan(v)}
    assert ({k: v for k, v in metrics.items() if k not in nan}
            == {k: v for k, v in ddp[1]["metrics"].items() if k not in nan})


def _cli(tmp_path, entry, *overrides):
    run_dir = tmp_path / "run"
    run([*entry, "trainer=ddp", "data.dataset_kwargs.num_nodes=200", *overrides,
         f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["debug=fdr"],
                                       ["model=mowst", "trainer.max_epochs=4",
                                        "model.pretrain_weak_epochs=1",
                                        "model.pretrain_strong_epochs=1",
                                        "+data.batch_size=32", "~callbacks.rich_progress_bar"]],
                         ids=["fdr", "mowst_mini_batch"])
def test_cli_under_ddp(tmp_path, overrides):
    # Lightning's `ddp` re-runs the command (with Hydra's run dir) for rank 1.
    run_dir = _cli(tmp_path, [sys.executable, "-m", "moegraph.train"], *overrides)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= saved["metrics"]["test/acc"] <= 1.0
    assert saved["config"]["trainer"]["devices"] == 2
    # rank 1 ran in the same run dir (its Hydra job log is there)
    assert (run_dir / "train_ddp_process_1.log").is_file()


@pytest.mark.slow
def test_moegraph_train_script_under_ddp(tmp_path):
    script = shutil.which("moegraph-train", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the moegraph-train script is not installed")
    run_dir = _cli(tmp_path, [script], "debug=fdr", "+data.batch_size=32")
    assert (run_dir / "metrics.json").is_file()


def test_cli_expert_parallel_under_ddp(tmp_path):
    # `model.expert_parallel=true`: the test-time checkpoint load and the
    # diagnostic forward pass are collectives with sharded experts; both
    # processes run them and the run ends (no hang), rank 0 writes.
    run_dir = _cli(tmp_path, [sys.executable, "-m", "moegraph.train"],
                   "model.expert_parallel=true", "trainer.max_epochs=2", "logger=none",
                   "~callbacks.rich_progress_bar")
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= saved["metrics"]["test/acc"] <= 1.0
    load = json.loads((run_dir / "expert_load.json").read_text())
    # one MoE block (the plain 2-layer stack), all 8 experts: the full layout
    assert len(load) == 1 and all(len(layer) == 8 for layer in load)
