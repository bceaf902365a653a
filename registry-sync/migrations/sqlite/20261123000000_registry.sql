-- Device identities (fleet-registry/1). Keys are never stored, only sha256(key).
CREATE TABLE devices (
    device_id  TEXT    PRIMARY KEY NOT NULL,
    key_sha256 BLOB    NOT NULL,
    status     TEXT    NOT NULL CHECK (status IN ('enabled', 'disabled')),
    tags       TEXT    NOT NULL,
    created_at BIGINT  NOT NULL,
    updated_at BIGINT  NOT NULL,
    version    BIGINT  NOT NULL,
    origin     TEXT    NOT NULL,
    deleted    BOOLEAN NOT NULL,
    seq        BIGINT  NOT NULL
) WITHOUT ROWID;
CREATE INDEX devices_by_seq ON devices (seq);

-- One row: the registry's region, identity, hybrid logical clock and change sequence.
-- Every write transaction locks it first.
CREATE TABLE registry_meta (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    region   TEXT,
    store_id TEXT,
    hlc      BIGINT NOT NULL,
    seq      BIGINT NOT NULL
);
INSERT INTO registry_meta (id, region, store_id, hlc, seq) VALUES (1, NULL, NULL, 0, 0);

-- How far `registry-sync follow` has applied each source registry.
CREATE TABLE registry_follow (
    source_id  TEXT   PRIMARY KEY NOT NULL,
    seq        BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
