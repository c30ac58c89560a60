//! The contract every store backend passes: etcd's semantics as the API server relies on them.

#![allow(dead_code, reason = "each test binary uses a different part")]

use std::{sync::Arc, time::Duration};

use control_plane_store::{EventKind, ListOptions, Store, StoreError};

const WAIT: Duration = Duration::from_secs(10);

fn v(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// Every check, on one store. Keys live under `root` so runs cannot collide.
pub async fn run<S: Store>(store: Arc<S>, root: &str) {
    create_get_update_delete(&*store, root).await;
    ranges(&*store, root).await;
    watches(&*store, root).await;
    concurrent_compare_and_swap(store.clone(), root).await;
    compaction(&*store, root).await;
}

async fn create_get_update_delete<S: Store>(s: &S, root: &str) {
    let key = format!("{root}/crud/a");
    let before = s.revision().await.unwrap();
    let created = s.create(&key, v("1")).await.unwrap();
    assert!(
        created.mod_revision > before,
        "a write takes a new revision"
    );
    assert_eq!(created.create_revision, created.mod_revision);
    assert_eq!(s.get(&key).await.unwrap(), Some(created.clone()));
    assert!(
        matches!(
            s.create(&key, v("x")).await,
            Err(StoreError::AlreadyExists(_))
        ),
        "create is exclusive"
    );

    let stale = created.mod_revision - 1;
    match s.update(&key, v("2"), stale).await {
        Err(StoreError::Conflict {
            current: Some(current),
            ..
        }) => {
            assert_eq!(
                current.value,
                v("1"),
                "a conflict reports the current value"
            )
        }
        other => panic!("update at a stale revision must conflict: {other:?}"),
    }
    let updated = s.update(&key, v("2"), created.mod_revision).await.unwrap();
    assert!(updated.mod_revision > created.mod_revision);
    assert_eq!(
        updated.create_revision, created.create_revision,
        "the create revision stays"
    );
    assert_eq!(s.get(&key).await.unwrap().unwrap().value, v("2"));
    assert!(matches!(
        s.update(&format!("{root}/crud/missing"), v("x"), 1).await,
        Err(StoreError::NotFound(_))
    ));

    assert!(matches!(
        s.delete(&key, Some(created.mod_revision)).await,
        Err(StoreError::Conflict { .. })
    ));
    let deleted = s.delete(&key, Some(updated.mod_revision)).await.unwrap();
    assert_eq!(deleted.value, v("2"), "delete returns the last value");
    assert!(
        deleted.mod_revision > updated.mod_revision,
        "with the deletion's revision"
    );
    assert_eq!(s.get(&key).await.unwrap(), None);
    assert!(matches!(
        s.delete(&key, None).await,
        Err(StoreError::NotFound(_))
    ));
    // A deleted key can be created again, with a new create revision.
    let again = s.create(&key, v("3")).await.unwrap();
    assert!(again.create_revision > deleted.mod_revision);
}

async fn ranges<S: Store>(s: &S, root: &str) {
    let prefix = format!("{root}/ranges/");
    for name in ["c", "a", "e", "b", "d"] {
        s.create(&format!("{prefix}{name}"), v(name)).await.unwrap();
    }
    // A sibling sharing the prefix's text but not its directory.
    s.create(&format!("{root}/rangesx"), v("no")).await.unwrap();
    let all = s.list(&prefix, ListOptions::default()).await.unwrap();
    let names: Vec<&str> = all.kvs.iter().map(|kv| &kv.key[prefix.len()..]).collect();
    assert_eq!(
        names,
        ["a", "b", "c", "d", "e"],
        "key order, only the prefix"
    );
    assert!(!all.more);

    // Pages of two, at the revision of the first page, while the range changes.
    let first = s
        .list(
            &prefix,
            ListOptions {
                limit: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(first.kvs.len(), 2);
    assert!(first.more);
    let b = first.kvs[1].clone();
    s.delete(&format!("{prefix}c"), None).await.unwrap();
    s.update(&b.key, v("changed"), b.mod_revision)
        .await
        .unwrap();
    let second = s
        .list(
            &prefix,
            ListOptions {
                start_after: Some(b.key.clone()),
                limit: Some(2),
                revision: Some(first.revision),
            },
        )
        .await
        .unwrap();
    let names: Vec<&str> = second
        .kvs
        .iter()
        .map(|kv| &kv.key[prefix.len()..])
        .collect();
    assert_eq!(
        names,
        ["c", "d"],
        "the second page sees the range as of the first (c still there)"
    );
    assert!(second.more);
    let now = s.list(&prefix, ListOptions::default()).await.unwrap();
    let names: Vec<&str> = now.kvs.iter().map(|kv| &kv.key[prefix.len()..]).collect();
    assert_eq!(names, ["a", "b", "d", "e"], "now c is gone");
    assert_eq!(now.kvs[1].value, v("changed"));
    let future = s.revision().await.unwrap() + 1000;
    assert!(matches!(
        s.list(
            &prefix,
            ListOptions {
                revision: Some(future),
                ..Default::default()
            }
        )
        .await,
        Err(StoreError::FutureRevision(_))
    ));
}

async fn watches<S: Store>(s: &S, root: &str) {
    let prefix = format!("{root}/watch/");
    let a = s.create(&format!("{prefix}a"), v("1")).await.unwrap();
    // From before the create: history first, then live changes.
    let mut watch = s.watch(&prefix, a.mod_revision - 1).await.unwrap();
    let b = s.update(&a.key, v("2"), a.mod_revision).await.unwrap();
    s.create(&format!("{root}/watchx"), v("other"))
        .await
        .unwrap();
    let d = s.delete(&a.key, None).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let event = tokio::time::timeout(WAIT, watch.next())
            .await
            .expect("an event in time")
            .unwrap()
            .unwrap();
        seen.push(event);
    }
    assert_eq!(seen[0].kind, EventKind::Put);
    assert_eq!(
        (seen[0].kv.mod_revision, seen[0].kv.value.clone()),
        (a.mod_revision, v("1"))
    );
    assert_eq!(
        (seen[1].kv.mod_revision, seen[1].kv.value.clone()),
        (b.mod_revision, v("2"))
    );
    assert_eq!(
        seen[1].prev.as_ref().map(|p| p.value.clone()),
        Some(v("1")),
        "puts carry the previous value"
    );
    assert_eq!(seen[2].kind, EventKind::Delete);
    assert_eq!(seen[2].kv.mod_revision, d.mod_revision);
    assert_eq!(
        seen[2].kv.value,
        v("2"),
        "a deletion carries the last value"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), watch.next())
            .await
            .is_err(),
        "nothing outside the prefix"
    );
}

async fn concurrent_compare_and_swap<S: Store>(s: Arc<S>, root: &str) {
    let key = format!("{root}/cas/counter");
    s.create(&key, v("0")).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (s, key) = (s.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0;
            for _ in 0..25 {
                loop {
                    let kv = s.get(&key).await.unwrap().unwrap();
                    let n: u64 = String::from_utf8(kv.value).unwrap().parse().unwrap();
                    match s
                        .update(&key, (n + 1).to_string().into_bytes(), kv.mod_revision)
                        .await
                    {
                        Ok(_) => break,
                        Err(StoreError::Conflict { .. }) => conflicts += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            conflicts
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let value = s.get(&key).await.unwrap().unwrap().value;
    assert_eq!(
        String::from_utf8(value).unwrap(),
        "200",
        "no increment was lost"
    );
}

async fn compaction<S: Store>(s: &S, root: &str) {
    let prefix = format!("{root}/compact/");
    let old = s.create(&format!("{prefix}k"), v("old")).await.unwrap();
    let new = s
        .update(&old.key, v("new"), old.mod_revision)
        .await
        .unwrap();
    let gone = s.create(&format!("{prefix}gone"), v("x")).await.unwrap();
    s.delete(&gone.key, None).await.unwrap();
    let at = s.revision().await.unwrap();
    s.compact(at).await.unwrap();
    assert!(s.compacted().await.unwrap() >= at);
    assert!(
        matches!(
            s.list(
                &prefix,
                ListOptions {
                    revision: Some(old.mod_revision),
                    ..Default::default()
                }
            )
            .await,
            Err(StoreError::Compacted { .. })
        ),
        "history before compaction is gone"
    );
    // Refused at once (SQLite) or as the stream's first item (etcd reports it there).
    match s.watch(&prefix, old.mod_revision).await {
        Err(StoreError::Compacted { .. }) => {}
        Ok(mut w) => assert!(
            matches!(
                tokio::time::timeout(WAIT, w.next()).await,
                Ok(Some(Err(StoreError::Compacted { .. })))
            ),
            "a watch from a compacted revision reports it"
        ),
        Err(e) => panic!("watch from a compacted revision: {e}"),
    }
    let now = s.list(&prefix, ListOptions::default()).await.unwrap();
    assert_eq!(
        now.kvs.len(),
        1,
        "latest values stay; deleted keys stay deleted"
    );
    assert_eq!(
        (now.kvs[0].value.clone(), now.kvs[0].mod_revision),
        (v("new"), new.mod_revision)
    );
    // Watching from the compaction revision on works.
    let mut watch = s.watch(&prefix, at).await.unwrap();
    s.update(&old.key, v("newer"), new.mod_revision)
        .await
        .unwrap();
    let event = tokio::time::timeout(WAIT, watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.kv.value, v("newer"));
}
