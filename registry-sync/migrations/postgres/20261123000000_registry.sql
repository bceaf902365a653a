-- Device identities (fleet-registry/1). Keys are never stored, only sha256(key).
-- Text columns that are ordered or compared use the "C" collation so that
-- PostgreSQL orders them byte-wise, exactly like SQLite and Rust: the merge
-- rule compares origins, and exports are sorted by device_id.
CREATE TABLE devices (
    device_id  TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    key_sha256 BYTEA   NOT NULL,
    status     TEXT    NOT NULL CHECK (status IN ('enabled', 'disabled')),
    tags       TEXT    NOT NULL,
    created_at BIGINT  NOT NULL,
    updated_at BIGINT  NOT NULL,
    version    BIGINT  NOT NULL,
    origin     TEXT COLLATE "C" NOT NULL,
    deleted    BOOLEAN NOT NULL,
    seq        BIGINT  NOT NULL
);
CREATE INDEX devices_by_seq ON devices (seq);

-- One row: the registry's region, identity, hybrid logical clock and change sequence.
-- Every write transaction locks it first (SELECT … FOR UPDATE).
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
