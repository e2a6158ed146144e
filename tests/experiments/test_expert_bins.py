r"""``experiments/mowst_expert_bins.py``: the gate-free combination of an MLP
and a GNN by the MLP's confidence, against hand-computed values."""
import pytest


@pytest.fixture
def bins(script):
    script("run_node_classification")  # what the script imports, by file name
    return script("mowst_expert_bins")


def test_combined_and_best_threshold_against_hand_values(bins):
    conf = [0.9, 0.8, 0.6, 0.4]
    mlp_ok = [True, True, False, True]
    gnn_ok = [False, True, True, False]
    # t = inf: the GNN alone, 2 of 4; t = 0.8: MLP on the first two (right,
    # right), GNN on the others (right, wrong): 3 of 4; t = 0.4: the MLP alone
    assert bins.combined(conf, mlp_ok, gnn_ok, float("inf")) == 0.5
    assert bins.combined(conf, mlp_ok, gnn_ok, 0.8) == 0.75
    assert bins.combined(conf, mlp_ok, gnn_ok, 0.4) == 0.75
    # 0.9 also gives 3 of 4 (MLP right on node 0; GNN right on 1, 2): the tie goes
    # to the largest t, the fewest nodes sent to the MLP
    assert bins.combined(conf, mlp_ok, gnn_ok, 0.9) == 0.75
    assert bins.best_threshold(conf, mlp_ok, gnn_ok) == 0.9
    # an MLP never better than the GNN: no node goes to it
    assert bins.best_threshold(conf, [False] * 4, gnn_ok) == float("inf")
    with pytest.raises(ValueError):  # one entry per node in every list
        bins.combined(conf, mlp_ok[:3], gnn_ok, 0.5)


def test_split_arrays_reads_both_experts(bins):
    record = {"mlp": {"test": {"prob": [[0.7, 0.3], [0.4, 0.6]], "y": [0, 0]}},
              "gnn": {"test": {"prob": [[0.2, 0.8], [0.9, 0.1]], "y": [0, 0]}}}
    conf, mlp_ok, gnn_ok = bins.split_arrays(record, "test")
    assert conf == [0.7, 0.6] and mlp_ok == [True, False] and gnn_ok == [False, True]
