-- 0001: bookkeeping of applied migrations.
-- Every migration inserts its own row; GET /schema/version reports the highest.
-- Names are unqualified: the migrations are applied with the target schema
-- first on the connecting role's search_path.

CREATE TABLE schema_version (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO schema_version (version, name) VALUES (1, '0001_schema_version');
