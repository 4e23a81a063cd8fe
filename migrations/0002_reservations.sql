-- Reservations (holds for one order), their allocations, and idempotency keys.

CREATE TABLE reservations (
    id          uuid        PRIMARY KEY,           -- UUIDv7
    order_id    text        NOT NULL,
    status      text        NOT NULL DEFAULT 'active'
                            CHECK (status IN ('active', 'fulfilled', 'released', 'expired')),
    strategy    text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    CONSTRAINT reservations_order_id_unique UNIQUE (order_id)
);

-- The expiry task's queue: only active holds, oldest deadline first.
CREATE INDEX reservations_expiring ON reservations (expires_at) WHERE status = 'active';

-- Units of one SKU held from one warehouse for one reservation. Held = quantity - fulfilled - released.
CREATE TABLE reservation_allocations (
    reservation_id uuid    NOT NULL REFERENCES reservations (id),
    sku            text    NOT NULL,
    warehouse      text    NOT NULL,
    line_no        integer NOT NULL,   -- position of the SKU in the order
    seq            integer NOT NULL,   -- position of the warehouse within the SKU's line
    quantity       bigint  NOT NULL CHECK (quantity > 0),
    fulfilled      bigint  NOT NULL DEFAULT 0 CHECK (fulfilled >= 0),
    released       bigint  NOT NULL DEFAULT 0 CHECK (released >= 0),
    PRIMARY KEY (reservation_id, sku, warehouse),
    FOREIGN KEY (sku, warehouse) REFERENCES stock_levels (sku, warehouse),
    CONSTRAINT allocation_not_overdrawn CHECK (fulfilled + released <= quantity)
);

-- The first execution of a request under an Idempotency-Key, stored in the same transaction
-- as its effect, so a retry replays it instead of applying it again.
CREATE TABLE idempotency_keys (
    key         text        PRIMARY KEY,
    method      text        NOT NULL,
    path        text        NOT NULL,
    request     text        NOT NULL,   -- the body as canonical JSON (sorted keys)
    status      smallint    NOT NULL,
    response    text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
