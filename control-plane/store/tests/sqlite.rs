//! The contract on the embedded SQLite store, and what only it has to prove: state survives a
//! reopen.

mod contract;

use std::sync::Arc;

use control_plane_store::{ListOptions, SqliteStore, Store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_passes_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path()).await.unwrap());
    contract::run(store, "/registry").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_and_revisions_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (revision, compacted) = {
        let store = SqliteStore::open(dir.path()).await.unwrap();
        let a = store.create("/registry/x/a", b"1".to_vec()).await.unwrap();
        store
            .update("/registry/x/a", b"2".to_vec(), a.mod_revision)
            .await
            .unwrap();
        let gone = store
            .create("/registry/x/gone", b"x".to_vec())
            .await
            .unwrap();
        store.delete(&gone.key, None).await.unwrap();
        store
            .compact(store.revision().await.unwrap())
            .await
            .unwrap();
        (
            store.revision().await.unwrap(),
            store.compacted().await.unwrap(),
        )
    };
    let store = SqliteStore::open(dir.path()).await.unwrap();
    assert_eq!(
        store.revision().await.unwrap(),
        revision,
        "revisions never go back"
    );
    assert_eq!(store.compacted().await.unwrap(), compacted);
    let list = store
        .list("/registry/x/", ListOptions::default())
        .await
        .unwrap();
    assert_eq!(list.kvs.len(), 1);
    assert_eq!(list.kvs[0].value, b"2");
    let next = store.create("/registry/x/b", vec![]).await.unwrap();
    assert!(
        next.mod_revision > revision,
        "new writes continue after the old revisions"
    );
}
