//! Leader election for control planes sharing one etcd: the scheduler and the controllers run in
//! one process at a time, the holder of the `kube-system/keel-controller-manager` Lease
//! (coordination.k8s.io/v1), as kube-controller-manager and kube-scheduler elect.
//!
//! As client-go's leaderelection: a candidate takes the lease when it is free or when its record
//! has not changed for `lease_duration` (time measured here, on this machine's monotonic clock,
//! from when this process saw the record change: clocks of other hosts never count); the holder
//! renews it every `retry_period` with compare-and-swap, and stops leading when it could not
//! renew for `renew_deadline`. The loops of a term run on a runtime of their own, dropped when
//! the term ends, so nothing of a lost term keeps writing; the process then stands again.

use std::{sync::Arc, time::Duration};

use control_plane_apiserver::{error::ApiError, registry::Registry};
use control_plane_store::AnyStore;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use tokio::time::Instant;

use crate::{Settings, informer::def};

pub const LEASE_NAMESPACE: &str = "kube-system";
pub const LEASE_NAME: &str = "keel-controller-manager";

/// How a process stands for leadership (client-go's defaults: 15 s, 10 s, 2 s).
#[derive(Clone, Debug)]
pub struct Election {
    /// Who this process is: stable across its restarts (so a restarted leader takes its lease
    /// back at once) and unique among the control planes sharing the store.
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

/// What a candidate saw of the lease: its record and when it last changed.
struct Observed {
    resource_version: Option<String>,
    holder: Option<String>,
    since: Instant,
}

enum Attempt {
    /// This process holds the lease now.
    Held,
    /// Someone else does.
    Other(String),
}

/// Stands for leadership until the process ends, running the loops (as
/// [`crate::start`] would) while this process leads.
pub fn start(registry: Arc<Registry<AnyStore>>, settings: Settings, election: Election) {
    tokio::spawn(async move {
        let mut observed = Observed {
            resource_version: None,
            holder: None,
            since: Instant::now(),
        };
        loop {
            match try_acquire_or_renew(&registry, &election, &mut observed).await {
                Ok(Attempt::Held) => {
                    tracing::info!(identity = %election.identity, "leading: starting the control loops");
                    lead(&registry, &settings, &election, &mut observed).await;
                    tracing::warn!(identity = %election.identity, "leadership lost: control loops stopped");
                }
                Ok(Attempt::Other(holder)) => {
                    tracing::debug!(%holder, "another control plane leads");
                }
                Err(e) => tracing::warn!(error = %e, "leader election failed"),
            }
            tokio::time::sleep(election.retry_period).await;
        }
    });
}

/// Runs the loops on a runtime of their own while the lease is renewed.
async fn lead(
    registry: &Arc<Registry<AnyStore>>,
    settings: &Settings,
    election: &Election,
    observed: &mut Observed,
) {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("control-loops")
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "building a runtime for the control loops failed");
            return;
        }
    };
    {
        let _inside = runtime.enter();
        if let Err(e) = crate::start(registry.clone(), settings) {
            tracing::error!(
                error = format!("{e:#}"),
                "starting the control loops failed"
            );
        }
    }
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(election.retry_period).await;
        match try_acquire_or_renew(registry, election, observed).await {
            Ok(Attempt::Held) => renewed = Instant::now(),
            Ok(Attempt::Other(holder)) => {
                tracing::warn!(%holder, "the lease was taken");
                break;
            }
            Err(e) if renewed.elapsed() < election.renew_deadline => {
                tracing::warn!(error = %e, "renewing the lease failed");
            }
            Err(e) => {
                tracing::warn!(
                    renew_deadline = ?election.renew_deadline,
                    error = %e,
                    "could not renew the lease"
                );
                break;
            }
        }
    }
    // Every task of the term goes with its runtime.
    runtime.shutdown_background();
}

fn now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

async fn try_acquire_or_renew(
    registry: &Registry<AnyStore>,
    election: &Election,
    observed: &mut Observed,
) -> Result<Attempt, ApiError> {
    let def = def::<Lease>();
    let ns = Some(LEASE_NAMESPACE);
    let duration_seconds = election.lease_duration.as_secs().max(1) as i32;
    let current = match registry.get(def, ns, LEASE_NAME).await {
        Ok(value) => Some(serde_json::from_value::<Lease>(value).map_err(ApiError::internal)?),
        Err(e) if e.reason == "NotFound" => None,
        Err(e) => return Err(e),
    };
    let Some(mut lease) = current else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.into()),
                namespace: Some(LEASE_NAMESPACE.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(election.identity.clone()),
                lease_duration_seconds: Some(duration_seconds),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        let value = serde_json::to_value(&lease).map_err(ApiError::internal)?;
        return match registry.create(def, ns, value, false).await {
            Ok(_) => Ok(Attempt::Held),
            Err(e) if e.reason == "AlreadyExists" => Ok(Attempt::Other(String::new())),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    if lease.metadata.resource_version != observed.resource_version {
        observed.resource_version = lease.metadata.resource_version.clone();
        observed.holder = holder.clone();
        observed.since = Instant::now();
    }
    let mine = holder.as_deref() == Some(election.identity.as_str());
    let expired = observed.since.elapsed() >= election.lease_duration;
    if !mine && holder.is_some() && !expired {
        return Ok(Attempt::Other(holder.unwrap_or_default()));
    }
    if !mine {
        spec.holder_identity = Some(election.identity.clone());
        spec.acquire_time = Some(now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.lease_duration_seconds = Some(duration_seconds);
    spec.renew_time = Some(now());
    let value = serde_json::to_value(&lease).map_err(ApiError::internal)?;
    // Conditional on the resourceVersion read: of two candidates, one wins.
    match registry
        .update(def, ns, LEASE_NAME, value, None, false)
        .await
    {
        Ok(updated) => {
            observed.resource_version = updated
                .pointer("/metadata/resourceVersion")
                .and_then(|v| v.as_str())
                .map(str::to_owned);
            observed.holder = Some(election.identity.clone());
            observed.since = Instant::now();
            Ok(Attempt::Held)
        }
        Err(e) if e.reason == "Conflict" => Ok(Attempt::Other(String::new())),
        Err(e) => Err(e),
    }
}
