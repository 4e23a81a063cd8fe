-- Event ids in a narrow table of their own.
--
-- The relay used to give an event its public id by updating the event row: a second copy of
-- the whole row (its JSON included), three more index entries, and a dead row for vacuum, for
-- every event. The event row is now written once (one index: its primary key) and the relay
-- inserts a small (id, txid, seq) row into `event_ids` (one index: the id).
--
-- Which events still need an id: the relay keeps, in `event_relay`, a writer horizon below which
-- every event has one (see writer_horizon(): no transaction below it can still write events),
-- and an id below which no event at or above that horizon was numbered. The events still
-- waiting are then the committed events at or above the horizon that are not among the ids
-- above that one (`unrelayed_events`) — found from the newest rows of both tables, however
-- large they grow.
--
-- Instances of an older version must be stopped before this runs: they would number events in
-- the dropped column.

-- Nobody writes events or numbers them while they move.
LOCK TABLE events IN ACCESS EXCLUSIVE MODE;

CREATE TABLE event_ids (
    id   bigint PRIMARY KEY,
    -- The event: events (txid, seq).
    txid xid8   NOT NULL,
    seq  bigint NOT NULL
);

INSERT INTO event_ids (id, txid, seq) SELECT id, txid, seq FROM events WHERE id IS NOT NULL;

CREATE TABLE event_relay (
    one            boolean PRIMARY KEY DEFAULT true CHECK (one),
    -- Every event of a transaction below this id has its id.
    horizon        xid8    NOT NULL,
    -- Every event at or above `horizon` that has an id has one above this.
    numbered_after bigint  NOT NULL
);

-- Events still without an id (unrelayed or written by a writer that is still running) are at or
-- above the horizon: the lowest of them, or the writer horizon now.
INSERT INTO event_relay (horizon, numbered_after)
SELECT h.horizon,
       coalesce((SELECT min(n.id) - 1 FROM event_ids n WHERE n.txid >= h.horizon),
                (SELECT max(n.id) FROM event_ids n),
                0)
  FROM (SELECT least(writer_horizon(), (SELECT min(txid) FROM events WHERE id IS NULL)) AS horizon) h;

ALTER TABLE events DROP CONSTRAINT events_pkey;
DROP INDEX events_unrelayed;
DROP INDEX events_by_age;
ALTER TABLE events DROP COLUMN id;
ALTER TABLE events ADD PRIMARY KEY (txid, seq);

-- The committed events that have no id yet.
CREATE VIEW unrelayed_events AS
SELECT e.*
  FROM event_relay r
  JOIN events e ON e.txid >= r.horizon
 WHERE NOT EXISTS (SELECT 1 FROM event_ids n
                    WHERE n.id > r.numbered_after AND n.txid = e.txid AND n.seq = e.seq);
