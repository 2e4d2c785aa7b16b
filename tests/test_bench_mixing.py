"""bench.mixing: the plan's own batches over an index laid out as `data pack` lays it out."""

from __future__ import annotations

from bench.mixing import Case, IndexOnly, groups_a_batch


def test_the_bench_shows_the_stored_orders_mix_against_the_whole_chunk_shuffle():
    """Breaks if the bench stops running, or stops telling the two stored orders apart: 100K samples
    of 100 groups in the source's geometry (41-row groups of 25 KB samples), unet224's stage 1."""
    case = Case("small", 100_000, 100, 25_000, "row_groups", 0)
    whole = groups_a_batch(case, "source", "chunk")
    in_order = groups_a_batch(case, "source", "window")
    shuffled = groups_a_batch(case, "shuffled", "window")
    # Measured: in order 5, shuffled 78, whole chunk 92.
    assert in_order <= whole / 4 and shuffled >= whole * 0.75, (whole, in_order, shuffled)


def test_the_benchs_index_is_the_one_data_pack_writes_for_its_sizes():
    """Breaks if IndexOnly stops laying samples out as storage/pack/order.py stores them."""
    import numpy as np

    from storage.pack.order import stored_order
    from storage.pack.sizes import choose_sizes

    ds = IndexOnly(20_000, 25_000, "shuffled")
    rps, rpg = choose_sizes(25_000, None, None)
    stored = stored_order(20_000, rps, rpg)
    slot = np.arange(20_000)
    assert ds.index_values("shard", stored).tolist() == (slot // rps).tolist()
    assert ds.index_values("row_group", stored).tolist() == ((slot % rps) // rpg).tolist()
    assert sum(sh["rows"] for sh in ds.manifest["shards"]) == 20_000
