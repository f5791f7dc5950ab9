"""Expert x data parallelism on 4 gloo ranks (minimoe.parallel.ep_dp): the groups, and one step's
outputs and gradients equal to one process holding the whole layer; without the
expert-data-parallel all-reduce the gradients differ."""

from ep_dp_workers import worker
from gloo_ranks import spawn


def test_ep_dp_on_four_ranks(tmp_path):
    ranks = spawn(worker, 4, tmp_path)
    two_by_two = [r["ep2 x dp2"] for r in ranks]
    assert [(r["ep_ranks"], r["dp_ranks"], r["experts"]) for r in two_by_two] == [
        ([0, 1], [0, 2], [0, 3]), ([0, 1], [1, 3], [4, 7]), ([2, 3], [0, 2], [0, 3]), ([2, 3], [1, 3], [4, 7])]
    for name in ("ep2 x dp2", "ep4 x dp1", "ep1 x dp4"):
        for r in ranks:
            assert all(v < 1e-5 for v in r[name]["diffs"].values()), (name, r[name])
    assert ranks[0]["ep4 x dp1"]["experts"] == [0, 1] and ranks[3]["ep1 x dp4"]["experts"] == [0, 7]
    # the wrong answer: averaging inside the EP group only leaves each half with its own mean
    for r in ranks:
        diffs = r["ep2, no dp all-reduce"]["diffs"]
        assert diffs["output"] < 1e-5 and diffs["router grad"] > 1e-4 and diffs["expert grads"] > 1e-4
        assert "ep_size must divide the world size 4, got 3" in r["ep3"]["exception"]
