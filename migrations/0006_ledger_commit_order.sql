-- Ledger pages in commit order, and a horizon that only the service's own writers hold back.
--
-- Entry ids are UUIDv7 made when a change is decided, not when it commits, so paging by id
-- could step past an entry whose transaction committed later. Every entry now records its
-- transaction id; a reader is shown only entries below the writer horizon, in (txid, id)
-- order: whatever commits afterwards has a txid at or above the horizon, so it sorts after any
-- cursor already handed out and a reader paging with `after` never misses it. Entries written
-- before this migration keep txid 0 (a constant default: no table rewrite).
ALTER TABLE ledger ADD COLUMN txid xid8 NOT NULL DEFAULT '0';
ALTER TABLE ledger ALTER COLUMN txid SET DEFAULT pg_current_xact_id();

CREATE INDEX ledger_in_commit_order ON ledger (txid, id);
CREATE INDEX ledger_by_level_in_commit_order ON ledger (sku, warehouse, txid, id);
CREATE INDEX ledger_by_reference_in_commit_order ON ledger (reference, txid, id) WHERE reference IS NOT NULL;
-- Replaced by the two above (same leading columns).
DROP INDEX ledger_by_level;
DROP INDEX ledger_by_reference;

-- The writer horizon: no transaction below it can still add ledger entries or events.
--
-- Every transaction that may write them announces itself with a shared advisory lock
-- (7041, 2) in its BEGIN, before it has a transaction id. A writer that has no id yet gets one
-- at or above the next id to be handed out, so the horizon is the smallest id of an announced
-- writer that has one, else the snapshot's xmax. Call it in a statement of its own and read
-- below it in a later statement: a writer that finished before the horizon was taken is then
-- visible. Unlike the cluster-wide snapshot xmin, a long transaction of anyone else (another
-- database, a session holding a row lock, a report) does not hold it back.
CREATE FUNCTION writer_horizon() RETURNS xid8 LANGUAGE sql VOLATILE AS $$
    WITH n AS (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8 AS nxt),
    writers AS (
        SELECT x.transactionid::text::int8 AS x32
          FROM pg_locks a
          JOIN pg_locks x ON x.virtualtransaction = a.virtualtransaction
                         AND x.locktype = 'transactionid' AND x.mode = 'ExclusiveLock' AND x.granted
         WHERE a.locktype = 'advisory' AND a.granted
           AND a.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND a.classid = 7041 AND a.objid = 2 AND a.objsubid = 2
    ), full_ids AS (
        -- A 32-bit id back to 64 bits: the value nearest the next id with these low bits.
        SELECT n.nxt, CASE
                   WHEN e.id > n.nxt + 2147483648 THEN e.id - 4294967296
                   WHEN e.id < n.nxt - 2147483648 THEN e.id + 4294967296
                   ELSE e.id END AS id
          FROM n LEFT JOIN writers w ON true
          CROSS JOIN LATERAL (SELECT ((n.nxt >> 32) << 32) | w.x32 AS id) e
    )
    SELECT least(min(nxt), coalesce(min(id), min(nxt)))::text::xid8 FROM full_ids
$$;
