"""Benchmark: the retention batch queries on PostgreSQL, 300,000 receipts of three nodes and
300,000 published events (ids running against time, the worst case for an id order): the
plan and time of one batch read in the age index's order, against the id order it replaced,
and of the loose index scan that lists the receipts' nodes.

    .venv/bin/python bench/retention_plans.py
"""
import sys, tempfile, datetime as dt
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from devstack.postgres import PostgresServer
from mailferry.db import open_database
work = Path(tempfile.mkdtemp())
pg = PostgresServer(work); pg.start()
try:
    url = pg.create_database("plan")
    d = open_database(url)
    d.execute_sql("INSERT INTO inbound_receipt (queue_id, outcome, stored_count, created_at, node) "
                  "SELECT 'Q'||g, 'stored', 1, now() - g * interval '1 second', 'mx'||mod(g, 3) FROM generate_series(1, 300000) g")
    d.execute_sql("INSERT INTO event (event_id, type, data, created_at, published_at) "
                  "SELECT md5(g::text), 'message.stored', '{}', now() - g * interval '1 second', now() - g * interval '1 second' FROM generate_series(1, 300000) g")
    d.execute_sql("ANALYZE")
    from scheduler.delivery_retention import _receipt_nodes
    import time
    t = time.perf_counter(); print(_receipt_nodes(), f"{(time.perf_counter()-t)*1000:.1f} ms")
    for q, p in [("SELECT id FROM inbound_receipt WHERE node = %s AND created_at < %s ORDER BY created_at LIMIT 1000 FOR UPDATE", ("mx1", dt.datetime.utcnow() - dt.timedelta(days=1))),
                 ("SELECT id FROM event WHERE published_at < %s ORDER BY published_at LIMIT 1000 FOR UPDATE", (dt.datetime.utcnow() - dt.timedelta(days=1),)),
                 ("SELECT id FROM event WHERE published_at < %s ORDER BY id LIMIT 1000 FOR UPDATE", (dt.datetime.utcnow() - dt.timedelta(days=1),))]:
        print(q); [print("   ", r[0]) for r in d.execute_sql("EXPLAIN ANALYZE " + q, p)]
finally:
    pg.stop()
