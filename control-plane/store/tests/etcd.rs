//! The contract on a real etcd (Debian's etcd-server), started by the test on free loopback
//! ports with its own data directory, and removed afterwards.

mod contract;

use std::sync::Arc;

use control_plane_store::{EtcdStore, Store, etcd_process::EtcdProcess};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_passes_the_contract() {
    let etcd = EtcdProcess::start().await.expect("etcd");
    let store = Arc::new(
        EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
            .await
            .unwrap(),
    );
    assert!(store.revision().await.unwrap() >= 1);
    contract::run(store, "/registry").await;
}
