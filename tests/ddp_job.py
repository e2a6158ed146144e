r"""A small training run for the distributed tests (``tests/test_distributed.py``):
``python tests/ddp_job.py OUT [--devices 2] [--model moe_gnn] ...``.

With ``--devices 2``, Lightning's DDP (``popen``: this script is re-run for
rank 1, gloo on CPU) trains on a small CSBM graph; every rank saves its final
parameters and the trainer's logged metrics to ``OUT.rank<r>.pt``.
"""
from __future__ import annotations

import argparse
import functools

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, Sampler
from torch_geometric.nn.models import MLP, GraphSAGE

from moegraph.data import NodeDataModule
from moegraph.data.loader import EpochRandomSampler, TorchNeighborLoader
from moegraph.nn import Mowst
from moegraph.nn.models import MoEGNN
from moegraph.nn.parallel import ShardedExperts
from moegraph.tasks import MowstTask, NodeClassificationTask

FEAT, C = 8, 3


class RankOrderSampler(Sampler):
    r"""One process replaying the seeds of ``ranks`` DDP processes: the
    seed order of :class:`EpochRandomSampler`, cut as each rank's
    ``DistributedSampler`` cuts it (every ``ranks``-th seed), then laid out
    batch by batch: rank 0's batch, rank 1's batch, ... With
    ``accumulate_grad_batches=ranks``, one process then takes the steps DDP
    takes (the mean of the per-rank gradients)."""

    def __init__(self, n: int, batch_size: int, ranks: int):
        self.inner = EpochRandomSampler(range(n))
        self.batch_size, self.ranks = batch_size, ranks

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        order = list(self.inner)
        shards = [order[r::self.ranks] for r in range(self.ranks)]
        out = []
        for start in range(0, len(shards[0]), self.batch_size):
            for shard in shards:
                out += shard[start:start + self.batch_size]
        return iter(out)


class StepLog(L.Callback):
    r"""The logged step values after each training batch."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()
                           if k.startswith("train/") and k != "train/acc"})


class JobData(NodeDataModule):
    def __init__(self, args, **kwargs):
        super().__init__(**kwargs)
        self.args = args

    def train_dataloader(self):
        args = self.args
        if args.empty_rank is not None:  # full graph; one rank has no training node
            data = self.data.clone()
            if self.trainer.global_rank == args.empty_rank:
                data.train_mask = torch.zeros_like(data.train_mask)
            return DataLoader([data], batch_size=None, collate_fn=lambda d: d)
        if args.emulate_ranks:
            mask = self.data.train_mask
            return TorchNeighborLoader(
                self.data, self.num_neighbors, input_nodes=mask, batch_size=self.batch_size,
                sampler=RankOrderSampler(int(mask.sum()), self.batch_size, args.emulate_ranks))
        return super().train_dataloader()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--model", default="moe_gnn", choices=["moe_gnn", "mowst", "mowst_star"])
    parser.add_argument("--batch-size", type=int, default=0, help="per process; 0: full batch")
    parser.add_argument("--num-nodes", type=int, default=240)
    parser.add_argument("--val-ratio", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--aux", action="store_true", help="weight the MoE aux losses")
    parser.add_argument("--emulate-ranks", type=int, default=0)
    parser.add_argument("--empty-rank", type=int, default=None)
    parser.add_argument("--expert-parallel", action="store_true")
    args = parser.parse_args()

    L.seed_everything(0)
    dm = JobData(args, name="synthetic", batch_size=args.batch_size or None,
                 num_neighbors=[-1, -1], dataset_kwargs=dict(
                     num_nodes=args.num_nodes, num_classes=C, num_features=FEAT,
                     val_ratio=args.val_ratio, seed=1))
    torch.manual_seed(0)
    adam = functools.partial(torch.optim.Adam, lr=0.02)
    if args.model == "moe_gnn":
        # SAGE (mean over in-edges) with full neighbourhoods: a seed's output
        # does not depend on the other seeds of its batch.
        net = MoEGNN(FEAT, 16, C, num_layers=2, conv="sage", num_experts=4, k=2,
                     ffn_hidden_channels=16, dropout=0.0)
        weights = {"load_balance": 0.1, "z_loss": 0.01} if args.aux else None
        task = NodeClassificationTask(net, num_classes=C, optimizer=adam,
                                      aux_loss_weights=weights,
                                      expert_parallel=args.expert_parallel)
    else:
        net = Mowst(MLP([FEAT, 16, C], dropout=0.0, norm=None),
                    GraphSAGE(FEAT, 16, 2, C, dropout=0.0), variant=args.model)
        task = MowstTask(net, num_classes=C, optimizer=adam, turn_patience=1,
                         max_turn_epochs=1, max_rounds=10, round_patience=10, min_delta=0.0,
                         pretrain_weak_epochs=0, pretrain_strong_epochs=0, crossfit_folds=0)
    strategy = (DDPStrategy(find_unused_parameters=True, start_method="popen")
                if args.devices > 1 else "auto")
    step_log = StepLog()
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy,
                        max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[step_log],
                        accumulate_grad_batches=max(args.emulate_ranks, 1))
    trainer.fit(task, datamodule=dm)
    torch.save({"params": {k: v.detach().clone() for k, v in task.net.state_dict().items()},
                "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
                "world_size": trainer.world_size, "steps": trainer.global_step,
                "step_log": step_log.steps,
                "schedule": dict(getattr(task, "_schedule", {})),
                "local_experts": [m.num_local_experts for m in task.modules()
                                  if isinstance(m, ShardedExperts)]},
               f"{args.out}.rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
