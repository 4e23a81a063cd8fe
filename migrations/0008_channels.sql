-- Sales channels: where orders come from, each selling from its own warehouses in its own order
-- of preference. `order_id` becomes unique per channel.

CREATE TABLE channels (
    code        text        PRIMARY KEY,
    name        text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- A channel's warehouses. `priority` NULL: the warehouse's own priority applies (and follows it
-- when it changes). `position` keeps the order the channel was given them in.
CREATE TABLE channel_warehouses (
    channel    text    NOT NULL REFERENCES channels (code) ON DELETE CASCADE,
    warehouse  text    NOT NULL REFERENCES warehouses (code),
    priority   integer,
    position   integer NOT NULL,
    PRIMARY KEY (channel, warehouse)
);

-- The channel a reservation was made for (NULL: none). Not a foreign key: a channel that is
-- changed or removed later never touches the reservations made through it.
ALTER TABLE reservations ADD COLUMN channel text;

-- One reservation per order and channel; reservations without a channel are unique among
-- themselves (NULLS NOT DISTINCT). Led by order_id, so lookups by order_id alone use it too.
ALTER TABLE reservations
    ADD CONSTRAINT reservations_order_id_unique_per_channel UNIQUE NULLS NOT DISTINCT (order_id, channel);
ALTER TABLE reservations DROP CONSTRAINT reservations_order_id_unique;
