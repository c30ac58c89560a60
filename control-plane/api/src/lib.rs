//! The gRPC feed between the control plane and node agents: the messages and services generated
//! from `proto/feed.proto`; [`connect`], which opens a TLS channel that presents the node token
//! on every call; the agent's side of the feed ([`session`]: register, heartbeat, follow the
//! stream with resume) and what it holds ([`view`]); and the conversion of Kubernetes objects
//! into the feed's types ([`convert`]), shared by the control plane and by agents that watch a
//! Kubernetes API server instead.

pub mod feed {
    tonic::include_proto!("keel.feed.v1");
}

pub mod convert;
pub mod session;
pub mod view;

use anyhow::{Context, Result};
use tonic::{
    metadata::AsciiMetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct BearerToken(AsciiMetadataValue);

impl BearerToken {
    pub fn new(token: &str) -> Result<Self> {
        Ok(Self(
            format!("Bearer {token}")
                .parse()
                .context("the token is not printable ASCII")?,
        ))
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type FeedClient =
    feed::node_feed_client::NodeFeedClient<InterceptedService<Channel, BearerToken>>;

/// Connects to the feed at `url` (`https://host:port`), trusting `ca_pem`, presenting `token`.
pub async fn connect(url: &str, ca_pem: &str, token: &str) -> Result<FeedClient> {
    let channel = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("feed address {url}"))?
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)))?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connect to the feed at {url}"))?;
    Ok(
        feed::node_feed_client::NodeFeedClient::with_interceptor(channel, BearerToken::new(token)?)
            // Snapshots of big clusters come in chunks, each well under this.
            .max_decoding_message_size(64 << 20),
    )
}
