-- Webhook subscriptions and their delivery progress, in two tables so that changing a
-- subscription never waits for a delivery in flight: a sender holds the lock on the progress
-- row (SELECT … FOR UPDATE SKIP LOCKED) for the whole attempt, so that one sender at a time,
-- in whichever service instance, delivers a subscription's events, in feed order.

CREATE TABLE webhooks (
    name       text        PRIMARY KEY,
    url        text        NOT NULL,
    -- `whsec_…` as given; never answered.
    secret     text        NOT NULL,
    -- The event types delivered; NULL: every type.
    types      text[],
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_progress (
    name              text        PRIMARY KEY REFERENCES webhooks ON DELETE CASCADE,
    -- Every event up to this feed id was delivered (acknowledged with a 2xx) or did not match.
    delivered_through bigint      NOT NULL,
    -- Failed attempts in a row at the next event; the pause before the next one grows with it.
    attempts          integer     NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    last_status       integer,
    last_error        text,
    last_attempt_at   timestamptz
);

CREATE INDEX webhook_progress_due ON webhook_progress (next_attempt_at);
