"""Several servers: rank blocks as LMCache maps them, and the layouts refused at start-up."""

from __future__ import annotations

import itertools

import pytest

from kvconn_plugin.config import check_topology, parse_config
from kvconn_plugin.errors import KVConnConfigError
from kvconn_plugin.parallel import kv_ranks, num_writers

TWO = {"lmcache.mp.server_urls": "tcp://a:1,tcp://b:2"}


def _layouts():
    for mla, n, tp, pp in itertools.product((False, True), (1, 2, 4), (1, 2, 4, 8), (1, 2)):
        world = tp * pp
        if world % n == 0 and (n == 1 or pp == 1) and tp >= n:
            yield mla, n, tp, pp


def test_tp2_on_two_servers_one_rank_each():
    r0, r1 = (kv_ranks(mla=False, world_size=2, rank=r, tp_size=2, n_servers=2) for r in (0, 1))
    assert (r0.server_index, r1.server_index) == (0, 1)
    # Each server sees a world of one rank, worker 0, TP 1.
    assert (r0.world_size, r0.worker_id, r0.tp_size) == (1, 0, 1) == (
        r1.world_size, r1.worker_id, r1.tp_size)


def test_contiguous_blocks():
    idx = [kv_ranks(mla=False, world_size=8, rank=r, tp_size=8, n_servers=2).server_index
           for r in range(8)]
    assert idx == [0, 0, 0, 0, 1, 1, 1, 1]
    ids = [kv_ranks(mla=False, world_size=8, rank=r, tp_size=8, n_servers=2).worker_id
           for r in range(8)]
    assert ids == [0, 1, 2, 3, 0, 1, 2, 3]


def test_mla_writes_once_per_server():
    writers = [kv_ranks(mla=True, world_size=4, rank=r, tp_size=4, n_servers=2).is_writer
               for r in range(4)]
    assert writers == [True, False, True, False]  # rank 2 is server B's first rank
    assert num_writers(mla=True, world_size=4, tp_size=4, n_servers=2) == 2
    assert num_writers(mla=True, world_size=4, tp_size=4) == 1
    assert num_writers(mla=False, world_size=4, tp_size=4, n_servers=2) == 4


def test_matches_lmcache_parallel_strategy():
    mod = pytest.importorskip("lmcache.integration.vllm.vllm_multi_process_adapter")
    for mla, n, tp, pp in _layouts():
        world = tp * pp
        for rank in range(world):
            ps = mod.ParallelStrategy(mla_only=mla, vllm_world_size=world, vllm_worker_id=rank,
                                      tp_size=tp, pp_size=pp, n_servers=n)
            ours = kv_ranks(mla=mla, world_size=world, rank=rank, tp_size=tp, n_servers=n)
            assert (ours.world_size, ours.worker_id, ours.num_kv_readers, ours.tp_size,
                    ours.is_writer, ours.server_index) == (
                ps.kv_world_size, ps.kv_worker_id, ps.num_kv_readers, ps.kv_tp_size,
                ps.is_kv_writer, rank // ps.ranks_per_server), (mla, n, tp, pp, rank)


def test_several_servers_default_autostart_off():
    assert parse_config(TWO, env={}).autostart is False
    assert parse_config({}, env={}).autostart is True
    with pytest.raises(KVConnConfigError, match=r"lmcache\.mp\.autostart"):
        parse_config({**TWO, "lmcache.mp.autostart": True}, env={})


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"world_size": 3}, r"server_urls lists 2 servers but the world size .* is 3"),
        ({"world_size": 1}, r"world size .* is 1"),
        ({"world_size": 4, "pipeline_parallel_size": 2}, r"server_urls.*pipeline_parallel_size=2"),
        ({"world_size": 2, "data_parallel_size": 2}, r"server_urls.*data_parallel_size=2"),
    ],
)
def test_refused_layouts_name_the_setting(kw, needle):
    with pytest.raises(KVConnConfigError, match=needle):
        check_topology(parse_config(TWO, env={}), **kw)


def test_accepted_layouts():
    check_topology(parse_config(TWO, env={}), world_size=4)
    # One server takes any layout.
    check_topology(parse_config({}, env={}), world_size=3, pipeline_parallel_size=3,
                   data_parallel_size=2)


def test_connector_refuses_a_layout_at_start_up():
    from tests.helpers.connector_config import CONNECTOR, MODULE_PATH
    from tests.helpers.sched_harness import make_scheduler, make_vllm_config

    cfg = make_vllm_config(connector=CONNECTOR, module_path=MODULE_PATH, extra_config={
        "lmcache.mp.server_urls": ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"],
        "lmcache.mp.autostart": False})
    with pytest.raises(KVConnConfigError, match=r"server_urls lists 2 servers .* is 1"):
        make_scheduler(cfg)  # world size 1: nothing is connected before the refusal
