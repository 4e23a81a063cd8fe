-- Catalogue, stock levels and the append-only ledger.
--
-- Every stock and ledger table is keyed by sku first so that the schema can later be
-- distributed (sharded) by sku without changing a statement.

CREATE TABLE warehouses (
    code        text        PRIMARY KEY,
    name        text        NOT NULL,
    region      text,
    priority    integer     NOT NULL DEFAULT 100,
    active      boolean     NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE skus (
    sku             text        PRIMARY KEY,
    name            text,
    backorder_limit bigint      NOT NULL DEFAULT 0 CHECK (backorder_limit >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- One row per (sku, warehouse). `backorder_limit` is a copy of the SKU's setting, kept in
-- step by the SKU upsert (in the same transaction), because a CHECK constraint can only see
-- its own row: it lets the database itself enforce invariant 2.
CREATE TABLE stock_levels (
    sku              text        NOT NULL REFERENCES skus (sku),
    warehouse        text        NOT NULL REFERENCES warehouses (code),
    on_hand          bigint      NOT NULL DEFAULT 0,
    reserved         bigint      NOT NULL DEFAULT 0,
    backorder_limit  bigint      NOT NULL DEFAULT 0,
    reorder_point    bigint      NOT NULL DEFAULT 0,
    reorder_quantity bigint      NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sku, warehouse),
    CONSTRAINT stock_on_hand_non_negative CHECK (on_hand >= 0),
    CONSTRAINT stock_reserved_non_negative CHECK (reserved >= 0),
    CONSTRAINT stock_available_above_floor CHECK (on_hand - reserved >= -backorder_limit),
    CONSTRAINT stock_reorder_settings_non_negative CHECK (reorder_point >= 0 AND reorder_quantity >= 0)
);

CREATE INDEX stock_levels_by_warehouse ON stock_levels (warehouse, sku);

-- Append-only: the application never updates or deletes a ledger row.
CREATE TABLE ledger (
    id             uuid        PRIMARY KEY,           -- UUIDv7, time ordered
    at             timestamptz NOT NULL DEFAULT now(),
    sku            text        NOT NULL,
    warehouse      text        NOT NULL,
    kind           text        NOT NULL CHECK (kind IN ('receive', 'adjust', 'transfer_out', 'transfer_in',
                                                        'reserve', 'release', 'expire', 'fulfil')),
    on_hand_delta  bigint      NOT NULL,
    reserved_delta bigint      NOT NULL,
    on_hand_after  bigint      NOT NULL,
    reserved_after bigint      NOT NULL,
    reference      text,
    reason         text,
    FOREIGN KEY (sku, warehouse) REFERENCES stock_levels (sku, warehouse)
);

CREATE INDEX ledger_by_level ON ledger (sku, warehouse, id);
CREATE INDEX ledger_by_reference ON ledger (reference, id) WHERE reference IS NOT NULL;

CREATE FUNCTION ledger_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only' USING ERRCODE = 'restrict_violation';
END $$;

CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_is_append_only();
