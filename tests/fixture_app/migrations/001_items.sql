CREATE TABLE items (
    id bigserial PRIMARY KEY,
    value text NOT NULL,
    instance text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
