"""The server against client pools: the pool protocol, payload validation, the strategy table."""

import numpy as np
import pytest

from fedloop import LocalPool, RunConfig, Server
from fedloop import strategies as st
from fedloop.client import Upload


def lin(tmp_path, **kw):
    base = dict(task="linear", strategy="tsfa", rounds=2, clients=4, rank=4, keep=2, lr=0.02, out=str(tmp_path),
                linear={"dim": 16, "samples": 64, "test_samples": 128})
    base.update(kw)
    return RunConfig(**base)


class Tampering(LocalPool):
    """A pool whose client 0 sends bytes that are not a payload and client 1 never answers."""

    def upload(self, t, sent, keep, bandwidth_hz):
        out = super().upload(t, sent, keep, bandwidth_hz)
        if 0 in out:
            out[0] = Upload(payload=b"not a payload", bits=104, head=out[0].head)
        out.pop(1, None)
        return out


@pytest.mark.parametrize("strategy", ["fedit", "fixed"])
def test_a_bad_or_missing_upload_drops_only_that_client(tmp_path, strategy):
    server = Server(lin(tmp_path, strategy=strategy))
    clean = Server(lin(tmp_path, strategy=strategy))
    row = server.step(Tampering(server))
    clients = server.history.clients
    assert clients[0]["status"].startswith("rejected: ") and clients[0]["uplink_bits"] == 0
    assert clients[1]["status"] == "error: no reply" and clients[1]["uplink_bits"] == 0
    assert [c["status"] for c in clients[2:]] == ["ok", "ok"]
    assert row["scheduled"] == 2 and row["dropped"] == 2
    # the others' bits are what they would have been, and the aggregate moved
    ref = clean.step(LocalPool(clean))
    assert row["uplink_bits"] == sum(c["uplink_bits"] for c in clean.history.clients[2:])
    assert ref["scheduled"] == 4
    moved = any(not np.allclose(a[0], b[0]) for a, b in zip(server.global_factors.values(),
                                                            clean.global_factors.values(), strict=True))
    assert moved  # two clients fewer in the average: a different global adapter


def test_the_strategy_table_is_the_one_source(tmp_path):
    assert set(st.STRATEGIES) == set(st.STRATEGY_TABLE)
    assert set(st.WIRE_STRATEGIES) == {"tsfa", "fixed", "random", "fedit", "lowrank"}
    assert set(st.SOFT_STRATEGIES) == {"tsfa", "fixed", "random", "svd"}
    with pytest.raises(ValueError, match="strategy must be one of"):
        st.get("magic")
    # a SOFT wire strategy's payload is bytes that its own decode accepts
    for name in ("tsfa", "fixed", "random", "fedit"):
        server = Server(lin(tmp_path, strategy=name))
        pool = LocalPool(server)
        pool.train(0)
        up = pool.upload(0, [0], {0: 2}, {0: 1e6})[0]
        assert isinstance(up.payload, bytes) and up.bits == 8 * len(up.payload)
        assert server.strategy.decode(up.payload, 2, server).keep == 2
        with pytest.raises(ValueError, match="components"):
            server.strategy.decode(up.payload, 3, server)  # a payload that does not fit its allocation
