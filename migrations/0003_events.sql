-- The transactional outbox. A change writes its events in its own transaction (`seq`, from a
-- sequence, so in no useful order across transactions). The relay task then gives committed
-- events their public, gap-free `id`, in order, once no older transaction can still commit
-- events (`txid` below the oldest running transaction): a reader paging by `id` never misses one.

CREATE TABLE events (
    seq            bigserial   PRIMARY KEY,
    id             bigint      UNIQUE,
    txid           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    at             timestamptz NOT NULL DEFAULT now(),
    type           text        NOT NULL,
    sku            text,
    warehouse      text,
    reservation_id uuid,
    data           jsonb       NOT NULL DEFAULT '{}'
);

CREATE INDEX events_unrelayed ON events (seq) WHERE id IS NULL;
CREATE INDEX events_by_age ON events (at);
