"""A tiny run of the benchmark harness (a few streams, seconds), so that it cannot rot.

No timing thresholds: only that the pieces start, talk and count. Needs aiohttp (requirements-bench.txt).
"""

from __future__ import annotations

import pytest

pytest.importorskip("aiohttp")

from bench import floor, measures, report  # noqa: E402
from bench import server as srv  # noqa: E402
from bench.load import running_at_once  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def open_files():
    srv.raise_nofile()


def test_streams_are_counted_and_cpu_is_read():
    # Enough tokens for the server's CPU time to show in /proc, which counts in 10 ms ticks.
    with srv.service("gevent", 1, srv.pace_env(2000, 0)) as server:
        run = measures.load(server, measures.SSE, 20, 3)
        assert run.completed == 20 and run.tokens == 20 * 2000
        assert all(s.ttfb is not None and s.ttfd is not None and s.error is None for s in run.streams)
        assert run.cpu_s > 0 and run.rss_peak > 0
        assert 1 <= running_at_once(run.streams) <= 3
        row = measures._concurrency_row("service", 20, run)
        assert row["complete"] == 20 and "TTFB p99 ms" in report.table([row])
    assert not server.scratch.exists()  # its SQLite file went with it


def test_disconnect_after_n_events_and_cut_off_window():
    with srv.service("gevent", 1, srv.pace_env(40, 20)) as server:
        cut = measures.load(server, measures.SSE, 2, 2, disconnect_after=3)
        assert [s.complete for s in cut.streams] == [False, False]
        late = measures.load(server, measures.SSE, 2, 2, window_s=0.5)
        assert all(s.error == "cut off" for s in late.streams)
        assert server.get_json("/healthz")["status"] == "ok"  # the server took the cuts in its stride


def test_relay_through_the_bench_upstream():
    with srv.upstream(0, 12) as upstream:
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        direct = measures.load(upstream, "/v1/chat/completions", 2, 2, body=body)
        assert direct.completed == 2 and direct.tokens == 24
        env = {"LLM_PROVIDER": "openai", "OPENAI_BASE_URL": upstream.url + "/v1", "OPENAI_API_KEY": "x"}
        with srv.service("gevent", 1, env) as relay:
            relayed = measures.load(relay, measures.SSE, 2, 2)
            assert relayed.completed == 2 and relayed.tokens == 24


@pytest.mark.parametrize("client", list(floor.CLIENTS))
def test_p3s_floor_reads_every_answer_with_no_server(client):
    with srv.upstream(0, 12) as upstream:
        run = measures._floor(upstream, 3, client)
        assert run.completed == 3 and run.tokens == 36 and run.cpu_s > 0
        assert all(s.ttfd is not None and s.ttfd <= s.ended for s in run.streams)


def test_the_reconnect_storm_resumes_every_stream(postgres, redis_server):
    """The storm measure at a small scale, against the servers the tests start."""
    import asyncio

    from bench.storm import _storm

    env = {**srv.pace_env(60, 20), "DATABASE_URL": postgres.url(postgres.create_database()),
           "REDIS_URL": redis_server.url(), "RESUME_GRACE_S": "30"}
    with srv.service("gevent", 1, env) as a, srv.service("gevent", 1, env) as b:
        hops, _, cpu_b, last = asyncio.run(_storm(a, b, 10, read_s=1.0))
    assert [(h.error, h.ids_continue) for h in hops] == [(None, True)] * 10
    assert all(h.text_a and h.text_b for h in hops)  # each read part of its answer on each host


def test_the_reconnect_burst_resumes_every_stream_on_the_same_worker():
    """The burst measure at a small scale on the embedded default: P2's streams, then live streams
    dropped and resumed by the worker that produces them, each counted and compared with the saved
    answer."""
    from bench.storm import burst, burst_rows

    # 1.5 s answers: the last client arrives at 0.9 s, every client drops at 1.3 s
    with srv.service("gevent", 1, {**srv.pace_env(45, 30), "RESUME_GRACE_S": "30"}) as server:
        result = burst(server, server, 10, read_s=0.3)
    assert result.p2_complete == 10 and len(result.p2_ttfb) == 10
    assert [(h.error, h.ids_continue) for h in result.hops] == [(None, True)] * 10
    assert all(h.text_a and h.text_b and h.ttfb is not None for h in result.hops)
    row = burst_rows("embedded", [result])[0]
    assert (row["resumed, no gap or duplicate"], row["gaps"], row["duplicates"]) == (10, 0, 0)
    assert "reconnect TTFB p99 ms" in report.table([row])


def test_a_short_soak_keeps_every_conversation():
    """A minute of the soak's mixed load (bench/soak.py) on two workers: no 5xx, every bad request
    a 4xx, no stream error, and every conversation saved as its clients read it."""
    from bench.soak import soak

    result = soak(1, clients=40)  # no chart: matplotlib is a benchmark dependency, not a test one
    summary = result["summary"][0]
    assert all(result["kinds"].values()), result["kinds"]  # every kind of request ran
    assert (summary["5xx"], summary["bad requests not 4xx"], summary["stream errors"]) == (0, 0, "-")
    assert (summary["left streaming"], summary["inconsistent"]) == (0, 0), result["inconsistent"]
    assert summary["conversations checked"] > 0
    assert len(result["workers"]) == 2 and all(w["samples"] > 1 for w in result["workers"])


def test_slow_clients_drip_while_normal_requests_are_timed():
    """The slow-clients measure at a small scale, on gevent, which reads each request apart."""
    import asyncio

    from bench.slow_clients import _measure

    with srv.service("gevent", 1, srv.pace_env(5, 0)) as server:
        port = int(server.url.rsplit(":", 1)[1])
        results = asyncio.run(_measure(port, 4, settle_s=0.5, probe_s=1.0, timeout_s=30))
        assert len(results) == 2 and all(r is not None for r in results)
        assert server.get_json("/healthz")["status"] == "ok"
