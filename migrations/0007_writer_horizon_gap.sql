-- The writer horizon, closing a gap: PostgreSQL gives a transaction its id (it is then running)
-- a moment before it takes the lock on that id that `pg_locks` shows. A writer caught in that
-- moment holds its announcement (7041, 2) but shows no id, so 0006's function could miss it.
-- Now any running transaction of the snapshot whose id has no lock row yet also caps the
-- horizon (conservative: it may be no writer at all, or one that has just finished; the next
-- call moves on). Both views of `pg_locks` come from one read.
CREATE OR REPLACE FUNCTION writer_horizon() RETURNS xid8 LANGUAGE sql VOLATILE AS $$
    WITH n AS (SELECT pg_current_snapshot() AS snap,
                      pg_snapshot_xmax(pg_current_snapshot())::text::int8 AS nxt),
    locks AS MATERIALIZED (
        SELECT locktype, virtualtransaction, granted, mode, transactionid::text::int8 AS x32,
               database, classid, objid, objsubid
          FROM pg_locks
    ),
    writers AS (
        SELECT x.x32
          FROM locks a
          JOIN locks x ON x.virtualtransaction = a.virtualtransaction
                      AND x.locktype = 'transactionid' AND x.mode = 'ExclusiveLock' AND x.granted
         WHERE a.locktype = 'advisory' AND a.granted
           AND a.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND a.classid = 7041 AND a.objid = 2 AND a.objsubid = 2
    ),
    full_ids AS (
        -- A 32-bit id back to 64 bits: the value nearest the next id with these low bits.
        SELECT CASE
                   WHEN e.id > n.nxt + 2147483648 THEN e.id - 4294967296
                   WHEN e.id < n.nxt - 2147483648 THEN e.id + 4294967296
                   ELSE e.id END AS id
          FROM n, writers w
          CROSS JOIN LATERAL (SELECT ((n.nxt >> 32) << 32) | w.x32 AS id) e
    ),
    unlocked AS (
        -- Running at the snapshot, but no lock on its id (yet, or any more).
        SELECT r::text::int8 AS id
          FROM n, pg_snapshot_xip(n.snap) AS r
         WHERE NOT EXISTS (SELECT 1 FROM locks l
                            WHERE l.locktype = 'transactionid' AND l.granted
                              AND l.x32 = r::text::int8 % 4294967296)
    )
    SELECT least((SELECT nxt FROM n),
                 (SELECT min(id) FROM full_ids),
                 (SELECT min(id) FROM unlocked))::text::xid8
$$;
