"""`python -m bench` runs the suite (about 10 minutes); `--quick` a short version (about 2).

`--only p1,p2` picks measures; `--before DIR` adds another checkout of the service (e.g. an older
commit, from `git worktree add`) to P1, P2 and P3, side by side in the same run; `--before-env
NAME=VALUE` sets a variable for that checkout only. `--postgres` adds the service on PostgreSQL
(a cluster the bench starts, as the tests do) to P1 and P2, beside the embedded default, and
`--redis` the service on PostgreSQL and Redis (with `--before`, that checkout too in each, on
the same servers). `storm` and `stop` (not in the default set) are the
reconnect storm and Stop between two hosts sharing PostgreSQL and Redis; `burst` (not in the default set) the
reconnect burst at P2's size, on the same worker and across hosts (bench/storm.py); `slow` (not in the default
set either) times normal requests while connections drip their headers (bench/slow_clients.py). `--soak [MINUTES]` runs
the soak instead (bench/soak.py; 20 minutes by default) and plots it (docs/soak.png).
"""

from __future__ import annotations

import argparse
import atexit
import json
import platform
import subprocess
import time
from pathlib import Path

from . import measures, server
from .measures import MEASURES
from .report import p4_chart, table


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return f"{cores} cores ({cpu}), Python {platform.python_version()}, {platform.system()} {platform.release()}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short version of each measure")
    parser.add_argument("--only", help="comma-separated: " + ",".join(MEASURES))
    parser.add_argument("--before", type=Path, help="another checkout of the service to compare in P1, P2 and P3")
    parser.add_argument("--before-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a variable for the --before checkout only (e.g. MAX_STREAMS_PER_KEY=100000 for one "
                        "from before 2026-11-25, where 0 refused every stream)")
    parser.add_argument("--postgres", action="store_true", help="add the service on PostgreSQL to P1 and P2")
    parser.add_argument("--redis", action="store_true", help="add the service on PostgreSQL and Redis to P1 and P2")
    parser.add_argument("--floor", action="store_true",
                        help="add the design's floor (naive Flask with a producer greenlet and its turns saved in "
                        "SQLite: bench/baselines/flask_floor_app.py) to the request measure, P1 and P2")
    parser.add_argument("--litellm", type=Path, metavar="EXECUTABLE",
                        help="add LiteLLM's proxy (the `litellm` of a venv of its own) to P3")
    parser.add_argument("--chart", type=Path, help="where to write the P4 chart (default docs/performance.png)")
    parser.add_argument("--soak", type=float, nargs="?", const=20.0, metavar="MINUTES",
                        help="run the soak (20 minutes unless given) instead of the measures")
    parser.add_argument("--soak-clients", type=int, default=500, help="the soak's clients (500)")
    parser.add_argument("--json", type=Path, help="write every row as JSON here")
    parser.add_argument("--markdown", action="store_true", help="print tables as Markdown")
    args = parser.parse_args()
    skipped = {"storm", "stop", "burst", "slow"} | ({"p2-10k"} if args.quick else set())  # only when asked for
    names = args.only.split(",") if args.only else [n for n in MEASURES if n not in skipped]
    before = args.before and server.Checkout(args.before, dict(kv.split("=", 1) for kv in args.before_env))
    if args.floor:
        measures.MORE_BASELINES["design floor (flask)"] = server.flask_floor_baseline
    if args.postgres or args.redis:
        from .databases import PostgresCluster, RedisServer

        cluster = PostgresCluster()
        atexit.register(cluster.remove)
        url = cluster.url(cluster.create_database())
        scaled_out = {}
        if args.postgres:
            scaled_out["PostgreSQL"] = {"DATABASE_URL": url}
        if args.redis:
            redis = RedisServer()
            atexit.register(redis.remove)
            scaled_out["PostgreSQL + Redis"] = {"DATABASE_URL": url, "REDIS_URL": redis.url()}
        for name, env in scaled_out.items():  # and the --before checkout on the same servers, beside it
            measures.VARIANTS[f"service, {name}"] = server.Checkout(env=env)
            if before:
                measures.VARIANTS[f"service (before), {name}"] = server.Checkout(before.root, {**before.env, **env})
    measures.LITELLM = args.litellm
    limit = server.raise_nofile()
    print(f"machine: {machine()}; open files: {limit}", flush=True)
    if args.soak is not None:
        from .soak import soak

        chart = args.chart or server.ROOT / "docs" / "soak.png"
        result = soak(args.soak, args.soak_clients, chart)
        for title in ("summary", "workers", "minutes"):
            print(f"\n## Soak: {title}\n\n{table(result[title], args.markdown)}", flush=True)
        for line in result["inconsistent"]:
            print("inconsistent:", line)
        print(f"\nchart: {chart}")
        if args.json:
            args.json.write_text(json.dumps({"machine": machine(), "soak": result}, indent=1, default=str))
        return
    results = {}
    for name in names:
        title, measure = MEASURES[name]
        start = time.monotonic()
        rows = results[name] = measure(args.quick, before)
        print(f"\n## {title} ({time.monotonic() - start:.0f} s)\n\n{table(rows, args.markdown)}", flush=True)
        if name == "p4":
            chart = args.chart or (
                Path("/tmp/bench-p4.png") if args.quick else server.ROOT / "docs" / "performance.png"
            )
            p4_chart(rows, chart)
            print(f"\nchart: {chart}")
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine(), "quick": args.quick, "results": results}, indent=1, default=str)
        )


if __name__ == "__main__":
    main()
