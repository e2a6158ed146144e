r"""Cluster launch: the submitit launcher configs compose (hydra-submitit-launcher,
the ``[cluster]`` extra), a 2-job sweep runs through the local submitit
launcher, and the GPU check's CPU dry run goes through every step."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                    reason="hydra-submitit-launcher (pip install -e '.[cluster]')")

ROOT = Path(__file__).resolve().parent.parent


def test_slurm_launcher_config_follows_the_trainer(compose_cfg):
    cfg = compose_cfg("hydra/launcher=slurm", "trainer=ddp", "trainer.accelerator=gpu",
                      "trainer.devices=4", "trainer.num_nodes=2",
                      "hydra.launcher.partition=gpu")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    # one job = 2 nodes x 4 tasks, one GPU per task: SLURM starts every DDP process
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu"
    assert OmegaConf.select(cfg, "hydra.launcher.submitit_folder").endswith(".submitit/%j")


def test_slurm_launcher_defaults_without_ddp(compose_cfg):
    launcher = compose_cfg("hydra/launcher=slurm").hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node) == (1, 1)  # trainer=cpu: one process


def test_local_launcher_config(compose_cfg):
    launcher = compose_cfg("hydra/launcher=local").hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.LocalLauncher")
    assert launcher.tasks_per_node == 1 and launcher.gpus_per_node == 0


@pytest.mark.slow
def test_two_job_sweep_through_the_local_launcher(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "moegraph.train", "-m", "hydra/launcher=local",
               "seed=0,1", "debug=fdr", "logger=none", "data.dataset_kwargs.num_nodes=80",
               f"hydra.sweep.dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(tmp_path.glob("*/metrics.json"))
    assert [p.parent.name for p in runs] == ["0", "1"]  # one job per run
    seeds = [json.loads(p.read_text())["config"]["seed"] for p in runs]
    assert seeds == [0, 1]
    jobs = [d for d in (tmp_path / ".submitit").iterdir() if d.name.isdigit()]
    assert len(jobs) == 2  # submitit's job folders, one per run


def test_gpu_check_dry_run(tmp_path):
    r"""``experiments/gpu_check.py --device cpu --quick`` in every CI run: each
    step runs and writes its result (so the script cannot rot between GPU
    loans). Its ``pytest`` step (``tests/gpu`` on the CPU) is left out here:
    this suite runs those tests itself. About a minute on one core."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    steps = ["bench_moe", "bench_graph_moe", "train_moe_gnn", "train_mowst", "bench_scale"]
    proc = subprocess.run([sys.executable, "experiments/gpu_check.py", "--device", "cpu",
                           "--quick", "--out", str(tmp_path), "--only", *steps,
                           "train_multitask"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    for step in steps:
        assert f"| {step} | ok |" in summary, step
    assert "| pytest |" not in summary  # --only ran only what it named
    for name in ("bench_moe.md", "bench_graph_moe.md", "scale.md"):
        assert (tmp_path / name).exists(), name


@pytest.mark.slow
def test_two_nodes_through_torchrun(tmp_path):
    r"""Multi-node training as a cluster runs it: two torchrun agents (one per
    "node", here both on this machine, gloo), one process each,
    ``trainer.num_nodes=2``; the experts are sharded across the nodes
    (``model.expert_parallel=true``: the all-to-all runs on the same world
    group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
                str(port)]
    train = ["-m", "moegraph.train", "trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2",
             "model.expert_parallel=true", "trainer.max_epochs=2", "+data.batch_size=64",
             "data.dataset_kwargs.num_nodes=300", "logger=none",
             f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(torchrun + ["--node-rank", str(r)] + train, cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in outputs[0]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())  # rank 0 writes
    assert metrics["config"]["trainer"]["num_nodes"] == 2
    assert 0.0 <= metrics["metrics"]["test/acc"] <= 1.0
