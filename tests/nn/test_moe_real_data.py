r"""The MoE block on a real graph's node features (Cora, from MOEGRAPH_DATA_DIR)."""
import torch
from torch_geometric.datasets import Planetoid

from moegraph.nn import SparseMoE


def test_cora_loads_from_a_copy_and_routes_every_node(real_data):
    root = real_data("Planetoid/Cora")
    data = Planetoid(str(root), "Cora")[0]
    assert data.num_nodes == 2708 and data.num_features == 1433
    assert (root / "Cora" / "processed").is_dir()  # written into the copy, not the source

    torch.manual_seed(0)
    moe = SparseMoE(data.num_features, 32, 7, num_experts=4, k=2).eval()
    out, routing = moe(data.x)
    assert out.shape == (2708, 7) and bool(torch.isfinite(out).all())
    # Every node is routed to exactly k = 2 distinct experts.
    assert torch.equal(routing.experts_per_row(), torch.full((2708,), 2))
    assert int(routing.load.sum()) == 2 * 2708
    dense = routing.dense_weight()
    torch.testing.assert_close(dense.sum(dim=1), torch.ones(2708))
