-- The cache index. Applied at every start; statements are idempotent.
-- PRAGMA user_version records the schema version for future migrations.

-- Every complete blob file under blobs/ (layers, configs and manifests alike).
CREATE TABLE IF NOT EXISTS blobs (
    digest      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    media_type  TEXT,               -- set for manifests: served as their Content-Type
    created     REAL NOT NULL,
    last_access REAL NOT NULL
);
-- Least recently used first, in one indexed scan (the evictor's query).
DROP INDEX IF EXISTS blobs_last_access;
CREATE INDEX IF NOT EXISTS blobs_lru ON blobs (last_access, digest);

-- The bytes and count of all rows of blobs, kept exact by the triggers below in the
-- same transaction as every change, whichever process makes it (`mirror gc` included).
CREATE TABLE IF NOT EXISTS totals (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    bytes  INTEGER NOT NULL,
    blobs  INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals (id, bytes, blobs)
    SELECT 1, coalesce(sum(size), 0), count(*) FROM blobs;
CREATE TRIGGER IF NOT EXISTS blobs_added AFTER INSERT ON blobs BEGIN
    UPDATE totals SET bytes = bytes + new.size, blobs = blobs + 1;
END;
CREATE TRIGGER IF NOT EXISTS blobs_removed AFTER DELETE ON blobs BEGIN
    UPDATE totals SET bytes = bytes - old.size, blobs = blobs - 1;
END;
CREATE TRIGGER IF NOT EXISTS blobs_resized AFTER UPDATE OF size ON blobs BEGIN
    UPDATE totals SET bytes = bytes + new.size - old.size;
END;

-- What a tag pointed to when last checked with the upstream, per upstream.
CREATE TABLE IF NOT EXISTS tags (
    upstream    TEXT NOT NULL,
    repository  TEXT NOT NULL,
    tag         TEXT NOT NULL,
    digest      TEXT NOT NULL,
    media_type  TEXT NOT NULL,
    checked_at  REAL NOT NULL,
    PRIMARY KEY (upstream, repository, tag)
);
CREATE INDEX IF NOT EXISTS tags_digest ON tags (digest);

-- Blobs fetched only through `authenticated` upstreams: never served through a public
-- one (a public upstream's own copy is fetched instead, which makes the blob public).
CREATE TABLE IF NOT EXISTS private_blobs (digest TEXT PRIMARY KEY);
CREATE TRIGGER IF NOT EXISTS private_blobs_removed AFTER DELETE ON blobs BEGIN
    DELETE FROM private_blobs WHERE digest = old.digest;
END;

PRAGMA user_version = 3;
