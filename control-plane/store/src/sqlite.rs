//! The embedded store: SQLite in the manner of k3s's kine. One table holds every revision of
//! every key (a row per write; deletions are tombstone rows); the row id is the revision. A
//! write is a new row whose `prev_revision` is the key's latest row, and a unique index on
//! `(name, prev_revision)` makes two writers racing from the same revision impossible. Watches
//! fan out in process from the writer; a watcher that falls behind re-reads from the table.

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
};

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{broadcast, mpsc};

use crate::{
    Event, EventKind, KeyValue, ListOptions, ListResult, Result, Store, StoreError, Watch,
    prefix_end,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    created INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    create_revision INTEGER NOT NULL,
    prev_revision INTEGER NOT NULL,
    value BLOB NOT NULL,
    old_value BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS kine_name_prev_revision ON kine (name, prev_revision);
CREATE INDEX IF NOT EXISTS kine_name_id ON kine (name, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
";

/// Events a watcher may be behind before it re-reads from the table.
const FANOUT_CAPACITY: usize = 16_384;

pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Held (an exclusive lock on `<dir>/lock`) while the store is open: two processes never
    /// share one embedded store.
    _lock: std::fs::File,
    conn: Mutex<Connection>,
    events: broadcast::Sender<Arc<Event>>,
    revision: AtomicI64,
    compacted: AtomicI64,
}

/// The latest row of a key.
struct Latest {
    id: i64,
    deleted: bool,
    create_revision: i64,
    value: Vec<u8>,
}

fn backend(e: impl Into<anyhow::Error>) -> StoreError {
    StoreError::Backend(e.into())
}

impl SqliteStore {
    /// Opens (or creates) the store in `dir`.
    pub async fn open(dir: &Path) -> Result<Self> {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || Self::open_blocking(&dir))
            .await
            .map_err(backend)?
    }

    fn open_blocking(dir: &Path) -> Result<Self> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        // Private to its owner: the store holds every Secret.
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
            .with_context(|| format!("create {}", dir.display()))
            .map_err(backend)?;
        let lock = lock(dir)?;
        let path = dir.join("state.db");
        // Made 0600 before SQLite opens it: its WAL and shared-memory files take its mode.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .and_then(|_| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)))
            .with_context(|| format!("create {}", path.display()))
            .map_err(backend)?;
        let conn = Connection::open(&path)
            .with_context(|| format!("open {}", path.display()))
            .map_err(backend)?;
        // WAL: readers never block the writer. NORMAL (kine's and k3s's choice too): a commit
        // is in the WAL when acknowledged, so a crash of the process (kill -9) loses nothing;
        // the WAL is synced to disk at checkpoints (every 1,000 pages), so a power loss or a
        // kernel crash may roll back the commits since the last one, never corrupt the store.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;",
        )
        .map_err(backend)?;
        conn.execute_batch(SCHEMA).map_err(backend)?;
        let revision: i64 = conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'kine'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)?
            .unwrap_or(0);
        let compacted: i64 = conn
            .query_row("SELECT value FROM meta WHERE key = 'compacted'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(backend)?
            .unwrap_or(0);
        let (events, _) = broadcast::channel(FANOUT_CAPACITY);
        Ok(Self {
            inner: Arc::new(Inner {
                _lock: lock,
                conn: Mutex::new(conn),
                events,
                revision: AtomicI64::new(revision),
                compacted: AtomicI64::new(compacted),
            }),
        })
    }

    /// Runs `f` with the connection on a blocking thread.
    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner, &mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = inner.conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&inner, &mut conn)
        })
        .await
        .map_err(backend)?
    }
}

/// Takes the store's lock (`<dir>/lock`, holding the owner's pid), or says who holds it.
fn lock(dir: &Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    let path = dir.join("lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))
        .map_err(backend)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut owner = String::new();
            let _ = file.read_to_string(&mut owner);
            return Err(backend(anyhow::anyhow!(
                "the embedded store in {} is in use by another process (pid {}): one store, one \
                 control plane (several control planes share etcd, not this store)",
                dir.display(),
                owner.trim()
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(backend(
                anyhow::Error::from(e).context(format!("lock {}", path.display())),
            ));
        }
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| write!(file, "{}", std::process::id()))
        .with_context(|| format!("write {}", path.display()))
        .map_err(backend)?;
    Ok(file)
}

fn latest(conn: &Connection, key: &str) -> Result<Option<Latest>> {
    conn.query_row(
        "SELECT id, deleted, create_revision, value FROM kine WHERE name = ?1 ORDER BY id DESC LIMIT 1",
        params![key],
        |r| {
            Ok(Latest {
                id: r.get(0)?,
                deleted: r.get::<_, i64>(1)? != 0,
                create_revision: r.get(2)?,
                value: r.get(3)?,
            })
        },
    )
    .optional()
    .map_err(backend)
}

impl Inner {
    /// Appends a row in its own transaction and publishes the event; returns the revision.
    #[expect(clippy::too_many_arguments, reason = "one row's columns")]
    fn append(
        &self,
        conn: &mut Connection,
        key: &str,
        created: bool,
        deleted: bool,
        create_revision: Option<i64>,
        prev: Option<&Latest>,
        value: &[u8],
    ) -> Result<i64> {
        let tx = conn.transaction().map_err(backend)?;
        tx.execute(
            "INSERT INTO kine (name, created, deleted, create_revision, prev_revision, value, old_value)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                key,
                created as i64,
                deleted as i64,
                create_revision.unwrap_or(0),
                prev.map_or(0, |p| p.id),
                value,
                prev.map(|p| p.value.as_slice()),
            ],
        )
        .map_err(|e| match e {
            // The unique (name, prev_revision) index: another write got there first.
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                StoreError::Conflict { key: key.to_owned(), expected: prev.map_or(0, |p| p.id), current: None }
            }
            e => backend(e),
        })?;
        let id = tx.last_insert_rowid();
        if create_revision.is_none() {
            tx.execute(
                "UPDATE kine SET create_revision = id WHERE id = ?1",
                params![id],
            )
            .map_err(backend)?;
        }
        tx.commit().map_err(backend)?;
        self.revision.store(id, Ordering::SeqCst);
        let kv = KeyValue {
            key: key.to_owned(),
            value: value.to_vec(),
            create_revision: create_revision.unwrap_or(id),
            mod_revision: id,
        };
        let prev_kv = prev.filter(|p| !p.deleted).map(|p| KeyValue {
            key: key.to_owned(),
            value: p.value.clone(),
            create_revision: p.create_revision,
            mod_revision: p.id,
        });
        let kind = if deleted {
            EventKind::Delete
        } else {
            EventKind::Put
        };
        // Sent under the connection lock: watchers see events in revision order.
        let _ = self.events.send(Arc::new(Event {
            kind,
            kv,
            prev: prev_kv,
        }));
        Ok(id)
    }
}

/// Rows of `prefix` written after `after`, as events, oldest first.
fn history(conn: &Connection, prefix: &str, after: i64) -> Result<Vec<Event>> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, name, deleted, create_revision, prev_revision, value, old_value, created FROM kine
             WHERE id > ?1 AND name >= ?2 AND name < ?3 ORDER BY id",
        )
        .map_err(backend)?;
    let rows = stmt
        .query_map(params![after, prefix, prefix_end(prefix)], |r| {
            let id: i64 = r.get(0)?;
            let name: String = r.get(1)?;
            let deleted = r.get::<_, i64>(2)? != 0;
            let create_revision: i64 = r.get(3)?;
            let prev_revision: i64 = r.get(4)?;
            let value: Vec<u8> = r.get(5)?;
            let old_value: Option<Vec<u8>> = r.get(6)?;
            // A create has no previous value, even when it follows a deletion of the key.
            let created = r.get::<_, i64>(7)? != 0;
            let prev = old_value
                .filter(|_| prev_revision > 0 && !created)
                .map(|v| KeyValue {
                    key: name.clone(),
                    value: v,
                    create_revision,
                    mod_revision: prev_revision,
                });
            Ok(Event {
                kind: if deleted {
                    EventKind::Delete
                } else {
                    EventKind::Put
                },
                kv: KeyValue {
                    key: name,
                    value,
                    create_revision,
                    mod_revision: id,
                },
                prev,
            })
        })
        .map_err(backend)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
}

impl Store for SqliteStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = key.to_owned();
        self.with_conn(move |_, conn| {
            Ok(latest(conn, &key)?
                .filter(|l| !l.deleted)
                .map(|l| KeyValue {
                    key,
                    value: l.value,
                    create_revision: l.create_revision,
                    mod_revision: l.id,
                }))
        })
        .await
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListResult> {
        let prefix = prefix.to_owned();
        self.with_conn(move |inner, conn| {
            let current = inner.revision.load(Ordering::SeqCst);
            let revision = opts.revision.filter(|&r| r > 0).unwrap_or(current);
            let compacted = inner.compacted.load(Ordering::SeqCst);
            if revision < compacted {
                return Err(StoreError::Compacted {
                    requested: revision,
                    compacted,
                });
            }
            if revision > current {
                return Err(StoreError::FutureRevision(revision));
            }
            let limit = opts.limit.map_or(-1, |l| l as i64 + 1);
            let mut stmt = conn
                .prepare_cached(
                    "SELECT k.name, k.value, k.create_revision, k.id FROM kine k
                     WHERE k.id IN (SELECT MAX(id) FROM kine
                                    WHERE name >= ?1 AND name < ?2 AND name > ?3 AND id <= ?4
                                    GROUP BY name)
                       AND k.deleted = 0
                     ORDER BY k.name LIMIT ?5",
                )
                .map_err(backend)?;
            let mut kvs = stmt
                .query_map(
                    params![
                        prefix,
                        prefix_end(&prefix),
                        opts.start_after.unwrap_or_default(),
                        revision,
                        limit
                    ],
                    |r| {
                        Ok(KeyValue {
                            key: r.get(0)?,
                            value: r.get(1)?,
                            create_revision: r.get(2)?,
                            mod_revision: r.get(3)?,
                        })
                    },
                )
                .map_err(backend)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(backend)?;
            let more = opts.limit.is_some_and(|l| kvs.len() > l);
            if let Some(l) = opts.limit {
                kvs.truncate(l);
            }
            Ok(ListResult {
                kvs,
                revision,
                more,
            })
        })
        .await
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<KeyValue> {
        let key = key.to_owned();
        self.with_conn(move |inner, conn| {
            let prev = latest(conn, &key)?;
            if prev.as_ref().is_some_and(|p| !p.deleted) {
                return Err(StoreError::AlreadyExists(key));
            }
            let id = inner
                .append(conn, &key, true, false, None, prev.as_ref(), &value)
                .map_err(|e| match e {
                    StoreError::Conflict { key, .. } => StoreError::AlreadyExists(key),
                    e => e,
                })?;
            Ok(KeyValue {
                key,
                value,
                create_revision: id,
                mod_revision: id,
            })
        })
        .await
    }

    async fn update(&self, key: &str, value: Vec<u8>, expected: i64) -> Result<KeyValue> {
        let key = key.to_owned();
        self.with_conn(move |inner, conn| {
            let Some(prev) = latest(conn, &key)?.filter(|p| !p.deleted) else {
                return Err(StoreError::NotFound(key));
            };
            if prev.id != expected {
                let current = KeyValue {
                    key: key.clone(),
                    value: prev.value,
                    create_revision: prev.create_revision,
                    mod_revision: prev.id,
                };
                return Err(StoreError::Conflict {
                    key,
                    expected,
                    current: Some(Box::new(current)),
                });
            }
            let id = inner.append(
                conn,
                &key,
                false,
                false,
                Some(prev.create_revision),
                Some(&prev),
                &value,
            )?;
            Ok(KeyValue {
                key,
                value,
                create_revision: prev.create_revision,
                mod_revision: id,
            })
        })
        .await
    }

    async fn delete(&self, key: &str, expected: Option<i64>) -> Result<KeyValue> {
        let key = key.to_owned();
        self.with_conn(move |inner, conn| {
            let Some(prev) = latest(conn, &key)?.filter(|p| !p.deleted) else {
                return Err(StoreError::NotFound(key));
            };
            if let Some(expected) = expected
                && prev.id != expected
            {
                let current = KeyValue {
                    key: key.clone(),
                    value: prev.value,
                    create_revision: prev.create_revision,
                    mod_revision: prev.id,
                };
                return Err(StoreError::Conflict {
                    key,
                    expected,
                    current: Some(Box::new(current)),
                });
            }
            let value = prev.value.clone();
            let id = inner.append(
                conn,
                &key,
                false,
                true,
                Some(prev.create_revision),
                Some(&prev),
                &value,
            )?;
            Ok(KeyValue {
                key,
                value,
                create_revision: prev.create_revision,
                mod_revision: id,
            })
        })
        .await
    }

    async fn watch(&self, prefix: &str, after: i64) -> Result<Watch> {
        let compacted = self.inner.compacted.load(Ordering::SeqCst);
        if after < compacted {
            return Err(StoreError::Compacted {
                requested: after,
                compacted,
            });
        }
        // Subscribe before reading history, so nothing falls between the two.
        let mut live = self.inner.events.subscribe();
        let (tx, rx) = mpsc::channel(1024);
        let store = SqliteStore {
            inner: self.inner.clone(),
        };
        let prefix = prefix.to_owned();
        tokio::spawn(async move {
            let mut last = after;
            loop {
                // History (and catching up after falling behind the fan-out).
                let p = prefix.clone();
                let from = last;
                let events = store
                    .with_conn(move |inner, conn| {
                        let compacted = inner.compacted.load(Ordering::SeqCst);
                        if from < compacted {
                            return Err(StoreError::Compacted {
                                requested: from,
                                compacted,
                            });
                        }
                        history(conn, &p, from)
                    })
                    .await;
                match events {
                    Ok(events) => {
                        for event in events {
                            last = event.kv.mod_revision;
                            if tx.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
                // Live events.
                loop {
                    match live.recv().await {
                        Ok(event) => {
                            if event.kv.mod_revision <= last || !event.kv.key.starts_with(&prefix) {
                                continue;
                            }
                            last = event.kv.mod_revision;
                            if tx.send(Ok((*event).clone())).await.is_err() {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        });
        Ok(Watch::new(rx))
    }

    async fn revision(&self) -> Result<i64> {
        Ok(self.inner.revision.load(Ordering::SeqCst))
    }

    async fn compact(&self, revision: i64) -> Result<()> {
        self.with_conn(move |inner, conn| {
            let current = inner.revision.load(Ordering::SeqCst);
            if revision > current {
                return Err(StoreError::FutureRevision(revision));
            }
            if revision <= inner.compacted.load(Ordering::SeqCst) {
                return Ok(());
            }
            let tx = conn.transaction().map_err(backend)?;
            // Everything up to `revision` except each key's latest row there, and tombstones.
            tx.execute(
                "DELETE FROM kine WHERE id <= ?1 AND (deleted = 1 OR id < (
                    SELECT MAX(k2.id) FROM kine k2 WHERE k2.name = kine.name AND k2.id <= ?1))",
                params![revision],
            )
            .map_err(backend)?;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('compacted', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![revision],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)?;
            inner.compacted.store(revision, Ordering::SeqCst);
            Ok(())
        })
        .await
    }

    async fn compacted(&self) -> Result<i64> {
        Ok(self.inner.compacted.load(Ordering::SeqCst))
    }
}
