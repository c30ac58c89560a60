//! The etcd store: one key per object, resourceVersion = etcd revision, compare-and-swap with
//! etcd transactions on mod revision, watch from a revision with previous values.

use std::collections::VecDeque;

use anyhow::anyhow;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    SortOrder, SortTarget, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchResponse,
    WatchStream,
};

use crate::{
    EtcdOptions, Event, EventKind, KeyValue, ListOptions, ListResult, Result, Store, StoreError,
    Watch, prefix_end,
};

/// How long connecting to an endpoint may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct EtcdStore {
    client: Client,
}

/// An etcd watch read in the caller's task: events are converted as they arrive, with no task
/// or channel between etcd's stream and the watcher (each hop costs a scheduling delay when
/// the machine is busy).
pub(crate) struct EtcdWatch {
    stream: WatchStream,
    after: i64,
    /// Events of the last response not yet handed out.
    pending: VecDeque<Result<Event>>,
    /// The watch has ended with an error; nothing more after `pending`.
    ended: bool,
}

impl EtcdWatch {
    /// Cancel safe: tonic's `Streaming::message` only polls the stream, whose state lives in
    /// it, so nothing is lost if the caller stops waiting (e.g. in `select!`).
    pub(crate) async fn next(&mut self) -> Option<Result<Event>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if self.ended {
                return None;
            }
            match self.stream.message().await {
                Ok(Some(resp)) => self.take(&resp),
                Ok(None) => return None,
                Err(e) => self.end(backend(e)),
            }
        }
    }

    fn end(&mut self, error: StoreError) {
        self.pending.push_back(Err(error));
        self.ended = true;
    }

    fn take(&mut self, resp: &WatchResponse) {
        if resp.compact_revision() > 0 {
            let compacted = resp.compact_revision();
            return self.end(StoreError::Compacted {
                requested: self.after,
                compacted,
            });
        }
        if resp.canceled() {
            let reason = resp.cancel_reason().to_owned();
            return self.end(StoreError::Backend(anyhow!("watch canceled: {reason}")));
        }
        for event in resp.events() {
            let Some(current) = event.kv() else { continue };
            let prev = event.prev_kv().map(kv).transpose();
            let converted = match (event.event_type(), kv(current), prev) {
                (EventType::Put, Ok(kv), Ok(prev)) => Event {
                    kind: EventKind::Put,
                    kv,
                    prev,
                },
                // A delete event's kv has no value: the last value is the previous one.
                (EventType::Delete, Ok(deleted), Ok(prev)) => Event {
                    kind: EventKind::Delete,
                    kv: KeyValue {
                        value: prev.as_ref().map(|p| p.value.clone()).unwrap_or_default(),
                        create_revision: prev.as_ref().map_or(0, |p| p.create_revision),
                        ..deleted
                    },
                    prev,
                },
                (_, Err(e), _) | (_, _, Err(e)) => return self.end(e),
            };
            self.pending.push_back(Ok(converted));
        }
    }
}

fn backend(e: etcd_client::Error) -> StoreError {
    StoreError::Backend(anyhow::Error::new(e))
}

fn kv(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    Ok(KeyValue {
        key: kv.key_str().map_err(backend)?.to_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    })
}

/// The key's value from a transaction's `get` branch, if any.
fn txn_get(ops: &[TxnOpResponse]) -> Result<Option<KeyValue>> {
    for op in ops {
        if let TxnOpResponse::Get(get) = op {
            return get.kvs().first().map(kv).transpose();
        }
    }
    Ok(None)
}

impl EtcdStore {
    pub async fn connect(endpoints: &[String]) -> Result<Self> {
        Self::connect_with(endpoints, &EtcdOptions::default()).await
    }

    /// Connects with TLS (etcd's CA, a client certificate) and a request timeout as `options`
    /// say.
    pub async fn connect_with(endpoints: &[String], options: &EtcdOptions) -> Result<Self> {
        let read = |path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|e| StoreError::Backend(anyhow!("read {}: {e}", path.display())))
        };
        let mut connect = ConnectOptions::new().with_connect_timeout(CONNECT_TIMEOUT);
        if let Some(timeout) = options.request_timeout {
            connect = connect.with_timeout(timeout);
        }
        let identity = match (&options.cert_file, &options.key_file) {
            (Some(cert), Some(key)) => Some(Identity::from_pem(read(cert)?, read(key)?)),
            (None, None) => None,
            _ => {
                return Err(StoreError::Backend(anyhow!(
                    "a client certificate needs its key, and a key its certificate \
                     (--etcd-certfile and --etcd-keyfile)"
                )));
            }
        };
        if options.ca_file.is_some() || identity.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &options.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let Some(identity) = identity {
                tls = tls.identity(identity);
            }
            connect = connect.with_tls(tls);
        }
        let client = Client::connect(endpoints, Some(connect))
            .await
            .map_err(backend)?;
        let store = Self { client };
        // Fail now, not at the first request, if nothing answers.
        store.revision().await?;
        Ok(store)
    }

    /// The revision compaction reached, read from a watch etcd refuses (etcd does not expose
    /// it otherwise). 0 if nothing was compacted.
    async fn compaction_floor(&self) -> Result<i64> {
        let mut client = self.client.clone();
        let mut stream = client
            .watch(
                "\0compaction-probe",
                Some(WatchOptions::new().with_start_revision(1)),
            )
            .await
            .map_err(backend)?;
        // The first response may only confirm the watch; the refusal follows it.
        for _ in 0..3 {
            let next =
                tokio::time::timeout(std::time::Duration::from_secs(2), stream.message()).await;
            match next {
                Ok(Ok(Some(resp))) if resp.compact_revision() > 0 => {
                    return Ok(resp.compact_revision());
                }
                Ok(Ok(Some(resp))) if resp.created() => continue,
                Ok(Err(e)) => return Err(backend(e)),
                _ => break,
            }
        }
        Ok(0)
    }
}

impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let resp = self.client.clone().get(key, None).await.map_err(backend)?;
        resp.kvs().first().map(kv).transpose()
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListResult> {
        let start = match &opts.start_after {
            // The smallest key after `after`.
            Some(after) if after.as_str() >= prefix => format!("{after}\0"),
            _ => prefix.to_owned(),
        };
        let mut get = GetOptions::new()
            .with_range(prefix_end(prefix))
            .with_sort(SortTarget::Key, SortOrder::Ascend);
        if let Some(limit) = opts.limit {
            get = get.with_limit(limit as i64);
        }
        if let Some(revision) = opts.revision.filter(|&r| r > 0) {
            get = get.with_revision(revision);
        }
        let resp = self
            .client
            .clone()
            .get(start, Some(get))
            .await
            .map_err(|e| match e {
                etcd_client::Error::GRpcStatus(ref s) if s.message().contains("compacted") => {
                    StoreError::Compacted {
                        requested: opts.revision.unwrap_or(0),
                        compacted: 0,
                    }
                }
                etcd_client::Error::GRpcStatus(ref s)
                    if s.message().contains("future revision") =>
                {
                    StoreError::FutureRevision(opts.revision.unwrap_or(0))
                }
                e => backend(e),
            })?;
        let header = resp
            .header()
            .ok_or_else(|| StoreError::Backend(anyhow!("no response header")))?;
        let revision = opts
            .revision
            .filter(|&r| r > 0)
            .unwrap_or(header.revision());
        Ok(ListResult {
            kvs: resp.kvs().iter().map(kv).collect::<Result<_>>()?,
            revision,
            more: resp.more(),
        })
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<KeyValue> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value.clone(), None)]);
        let resp = self.client.clone().txn(txn).await.map_err(backend)?;
        if !resp.succeeded() {
            return Err(StoreError::AlreadyExists(key.to_owned()));
        }
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok(KeyValue {
            key: key.to_owned(),
            value,
            create_revision: revision,
            mod_revision: revision,
        })
    }

    async fn update(&self, key: &str, value: Vec<u8>, expected: i64) -> Result<KeyValue> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected)])
            .and_then([TxnOp::put(
                key,
                value.clone(),
                Some(etcd_client::PutOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.client.clone().txn(txn).await.map_err(backend)?;
        if !resp.succeeded() {
            return match txn_get(&resp.op_responses())? {
                None => Err(StoreError::NotFound(key.to_owned())),
                Some(current) => Err(StoreError::Conflict {
                    key: key.to_owned(),
                    expected,
                    current: Some(Box::new(current)),
                }),
            };
        }
        let revision = resp.header().map_or(0, |h| h.revision());
        let create_revision = resp
            .op_responses()
            .iter()
            .find_map(|op| match op {
                TxnOpResponse::Put(put) => put.prev_key().map(|p| p.create_revision()),
                _ => None,
            })
            .unwrap_or(revision);
        Ok(KeyValue {
            key: key.to_owned(),
            value,
            create_revision,
            mod_revision: revision,
        })
    }

    async fn delete(&self, key: &str, expected: Option<i64>) -> Result<KeyValue> {
        let compare = match expected {
            Some(rev) => Compare::mod_revision(key, CompareOp::Equal, rev),
            None => Compare::create_revision(key, CompareOp::Greater, 0),
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::delete(
                key,
                Some(etcd_client::DeleteOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.client.clone().txn(txn).await.map_err(backend)?;
        if !resp.succeeded() {
            return match (txn_get(&resp.op_responses())?, expected) {
                (Some(current), Some(expected)) => Err(StoreError::Conflict {
                    key: key.to_owned(),
                    expected,
                    current: Some(Box::new(current)),
                }),
                _ => Err(StoreError::NotFound(key.to_owned())),
            };
        }
        let revision = resp.header().map_or(0, |h| h.revision());
        let prev = resp
            .op_responses()
            .iter()
            .find_map(|op| match op {
                TxnOpResponse::Delete(del) => del.prev_kvs().first().map(kv),
                _ => None,
            })
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(key.to_owned()))?;
        Ok(KeyValue {
            mod_revision: revision,
            ..prev
        })
    }

    async fn watch(&self, prefix: &str, after: i64) -> Result<Watch> {
        let options = WatchOptions::new()
            .with_range(prefix_end(prefix))
            .with_start_revision(after + 1)
            .with_prev_key();
        let stream = self
            .client
            .clone()
            .watch(prefix, Some(options))
            .await
            .map_err(backend)?;
        Ok(Watch::etcd(EtcdWatch {
            stream,
            after,
            pending: VecDeque::new(),
            ended: false,
        }))
    }

    async fn revision(&self) -> Result<i64> {
        let resp = self
            .client
            .clone()
            .get("\0", Some(GetOptions::new().with_count_only()))
            .await
            .map_err(backend)?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    async fn compact(&self, revision: i64) -> Result<()> {
        match self.client.clone().compact(revision, None).await {
            Ok(_) => Ok(()),
            // Compacting to a revision already compacted is fine.
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("compacted") => Ok(()),
            Err(e) => Err(backend(e)),
        }
    }

    async fn compacted(&self) -> Result<i64> {
        self.compaction_floor().await
    }
}
