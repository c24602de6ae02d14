CREATE INDEX items_value_idx ON items (value);
INSERT INTO schema_version VALUES (10);
