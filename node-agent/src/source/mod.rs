//! Where the desired state comes from: the control plane's feed ([`feed`]) or any Kubernetes
//! API server ([`kube`]). Both fill the agent's view and report what changed.

pub mod feed;
pub mod kube;

use std::sync::Arc;

use anyhow::Result;

use crate::{agent::Shared, config::SourceArgs};

/// Runs the configured source until the agent stops.
pub async fn run(args: SourceArgs, shared: Arc<Shared>) -> Result<()> {
    match (&args.feed, &args.kubeconfig) {
        (Some(_), _) => feed::run(&args, shared).await,
        (None, Some(path)) => kube::run(path, shared).await,
        (None, None) => anyhow::bail!("no source: --feed or --kubeconfig"),
    }
}
