-- Event ids in a narrow table of their own.
--
-- The relay used to give an event its public id by updating the event row: a second copy of
-- the whole row (its JSON included), three more index entries, and a dead row for vacuum, for
-- every event. The event row is now written once (one index: its primary key) and the relay
-- inserts a small (id, txid, seq) row into `event_ids` (one index: the id).
--
-- Which events still need an id: the relay keeps, in `event_relay`, a frontier — every event of
-- a transaction below `horizon` has its id, except those of the transactions in `running` (the
-- announced writers still running when the horizon was taken, and, to be safe, any transaction
-- of that snapshot whose id showed no lock yet) — and an id below which no event of the
-- frontier's open part was numbered. The events still waiting are the committed events
-- at or above the horizon or of those writers that are not among the ids above that one: a few
-- index probes of the newest rows, however large both tables grow and however long a writer
-- runs (`unrelayed_events()`).
--
-- Only an announced writer (db::begin_writer: the advisory lock (7041, 2) and, set with
-- SET LOCAL next to it, `inventory.writer`) may insert events: the trigger below refuses any
-- other transaction, whose events the frontier could pass while it runs.
--
-- Stop instances of an older version before this runs: they would number events in the column
-- dropped here. It holds the events table exclusively while it copies the ids (seconds for
-- millions of events).

LOCK TABLE events IN ACCESS EXCLUSIVE MODE;

-- The writer horizon's parts: the next transaction id of the snapshot, and every announced
-- writer that may be running below it (with 0007's caution: also a running transaction whose id
-- shows no lock yet). writer_horizon() is the least of them.
CREATE FUNCTION writer_frontier(OUT next_id xid8, OUT running xid8[]) LANGUAGE sql VOLATILE AS $$
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
    SELECT (SELECT nxt FROM n)::text::xid8,
           coalesce((SELECT array_agg(DISTINCT id::text::xid8 ORDER BY id::text::xid8)
                       FROM (SELECT id FROM full_ids UNION SELECT id FROM unlocked) r
                      WHERE id < (SELECT nxt FROM n)), '{}')
$$;

CREATE OR REPLACE FUNCTION writer_horizon() RETURNS xid8 LANGUAGE sql VOLATILE AS $$
    SELECT least(f.next_id, (SELECT min(r) FROM unnest(f.running) AS r)) FROM writer_frontier() f
$$;

CREATE TABLE event_ids (
    id   bigint NOT NULL,
    -- The event: events (txid, seq).
    txid xid8   NOT NULL,
    seq  bigint NOT NULL
);
INSERT INTO event_ids (id, txid, seq) SELECT id, txid, seq FROM events WHERE id IS NOT NULL;
ALTER TABLE event_ids ADD PRIMARY KEY (id);

CREATE TABLE event_relay (
    one            boolean PRIMARY KEY DEFAULT true CHECK (one),
    -- Every event of a transaction below this id has its id, except those of `running`.
    horizon        xid8    NOT NULL,
    running        xid8[]  NOT NULL,
    -- Every event at or above `horizon`, or of `running`, that has an id has one above this.
    numbered_after bigint  NOT NULL
);

-- Events still without an id (unrelayed, or written by a writer still running) are at or above
-- the horizon: the lowest of them, or the writer horizon now.
INSERT INTO event_relay (horizon, running, numbered_after)
SELECT h.horizon, '{}',
       coalesce((SELECT min(n.id) - 1 FROM event_ids n WHERE n.txid >= h.horizon),
                (SELECT max(n.id) FROM event_ids n),
                0)
  FROM (SELECT least(writer_horizon(), (SELECT min(txid) FROM events WHERE id IS NULL)) AS horizon) h;

ALTER TABLE events DROP CONSTRAINT events_pkey;
DROP INDEX events_unrelayed;
DROP INDEX events_by_age;
ALTER TABLE events DROP COLUMN id;
ALTER TABLE events ADD PRIMARY KEY (txid, seq);

-- The committed events that have no id yet (what the relay numbers next).
CREATE FUNCTION unrelayed_events() RETURNS SETOF events LANGUAGE plpgsql STABLE AS $$
DECLARE
    r event_relay;
BEGIN
    SELECT * INTO r FROM event_relay;
    RETURN QUERY
        SELECT e.* FROM events e
         WHERE (e.txid >= r.horizon OR e.txid = ANY (r.running))
           AND NOT EXISTS (SELECT 1 FROM event_ids n
                            WHERE n.id > r.numbered_after AND n.txid = e.txid AND n.seq = e.seq);
END
$$;

CREATE FUNCTION events_from_writers_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('inventory.writer', true) IS DISTINCT FROM 'on' THEN
        RAISE EXCEPTION 'events are written only by announced writers (see db::begin_writer)';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER events_from_writers_only BEFORE INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_from_writers_only();
