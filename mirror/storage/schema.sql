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
CREATE INDEX IF NOT EXISTS blobs_last_access ON blobs (last_access);

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

PRAGMA user_version = 1;
