CREATE TABLE schema_version (version int PRIMARY KEY);
INSERT INTO schema_version VALUES (1), (2);
