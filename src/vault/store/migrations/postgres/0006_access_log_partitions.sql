-- access_log becomes a table partitioned by month (UTC) of "at": the retention
-- purge drops whole months (a catalog change, no row locks, no vacuum debt)
-- instead of deleting millions of rows. The store creates upcoming months ahead
-- of time (PostgresStore.ensure_access_log_partitions); a row whose month has no
-- partition lands in access_log_default, so an insert never fails.
-- Partition names are access_log_yYYYYmMM: the store derives the bounds from them.

-- Keep the old table aside under names that do not collide with the new ones.
ALTER TABLE access_log RENAME TO access_log_pre0006;
ALTER TABLE access_log_pre0006 RENAME CONSTRAINT access_log_pkey TO access_log_pre0006_pkey;
DROP INDEX access_log_member_at_idx;
DROP INDEX access_log_at_idx;
ALTER SEQUENCE access_log_entry_id_seq RENAME TO access_log_pre0006_entry_id_seq;

-- PostgreSQL 15 allows an identity column on a partitioned table (inserts go
-- through the parent). A primary key must include the partition key; entry_id
-- alone stays unique because only the sequence assigns it.
CREATE TABLE access_log (
    entry_id  bigint      GENERATED ALWAYS AS IDENTITY,
    member_id uuid        NOT NULL,
    at        timestamptz NOT NULL,
    action_ct bytea       NOT NULL,
    ip_ct     bytea       NOT NULL,
    CONSTRAINT access_log_pkey PRIMARY KEY (entry_id, at),
    CONSTRAINT access_log_member_id_fkey
        FOREIGN KEY (member_id) REFERENCES members (member_id) ON DELETE CASCADE
) PARTITION BY RANGE (at);
CREATE INDEX access_log_member_at_idx ON access_log (member_id, at DESC, entry_id DESC);
-- The purge batch-deletes the boundary month (and the default partition) by age.
CREATE INDEX access_log_at_idx ON access_log (at);

CREATE TABLE access_log_default PARTITION OF access_log DEFAULT;

-- One partition per month that has rows, plus this month and the next two.
DO $$
DECLARE
    month timestamp;
BEGIN
    FOR month IN
        SELECT DISTINCT date_trunc('month', at AT TIME ZONE 'UTC') FROM access_log_pre0006
        UNION
        SELECT date_trunc('month', now() AT TIME ZONE 'UTC') + make_interval(months => n)
        FROM generate_series(0, 2) AS n
    LOOP
        -- Bounds carry an explicit +00 offset: never the session's time zone.
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF access_log FOR VALUES FROM (%L) TO (%L)',
            to_char(month, '"access_log_y"YYYY"m"MM'),
            to_char(month, 'YYYY-MM-DD HH24:MI:SS') || '+00',
            to_char(month + interval '1 month', 'YYYY-MM-DD HH24:MI:SS') || '+00'
        );
    END LOOP;
END
$$;

INSERT INTO access_log (entry_id, member_id, at, action_ct, ip_ct) OVERRIDING SYSTEM VALUE
SELECT entry_id, member_id, at, action_ct, ip_ct FROM access_log_pre0006;

-- Continue where the old sequence stopped: an entry id is never reused, not even
-- one whose entry was purged or shredded.
DO $$
DECLARE
    old_last bigint;
    old_called boolean;
    max_id bigint;
BEGIN
    SELECT last_value, is_called INTO old_last, old_called FROM access_log_pre0006_entry_id_seq;
    SELECT max(entry_id) INTO max_id FROM access_log;
    IF max_id IS NOT NULL AND (max_id > old_last OR (max_id = old_last AND NOT old_called)) THEN
        old_last := max_id;
        old_called := true;
    END IF;
    PERFORM setval(pg_get_serial_sequence('access_log', 'entry_id'), old_last, old_called);
END
$$;

DROP TABLE access_log_pre0006;
