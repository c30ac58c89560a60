//! The gRPC feed between the control plane and node agents: the messages and services generated
//! from `proto/feed.proto`; how a node gets and uses its identity ([`join`]: the bootstrap
//! token registers the node and gets its client certificate signed, which it then calls with,
//! [`connect_as_node`]); the agent's side of the feed ([`session`]: register, heartbeat, follow the
//! stream with resume) and what it holds ([`view`]); and the conversion of Kubernetes objects
//! into the feed's types ([`convert`]), shared by the control plane and by agents that watch a
//! Kubernetes API server instead.

pub mod feed {
    tonic::include_proto!("keel.feed.v1");
}

pub mod convert;
pub mod files;
pub mod session;
pub mod view;

use anyhow::{Context, Result};
use tonic::{
    metadata::AsciiMetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

/// How a feed client proves who it is: the bootstrap token (`authorization: Bearer`), good
/// for registering only, or nothing here because the channel presents the node's client
/// certificate.
#[derive(Clone)]
pub struct NodeAuth(Option<AsciiMetadataValue>);

impl NodeAuth {
    pub fn bootstrap(token: &str) -> Result<Self> {
        Ok(Self(Some(
            format!("Bearer {token}")
                .parse()
                .context("the token is not printable ASCII")?,
        )))
    }
}

impl Interceptor for NodeAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            req.metadata_mut().insert("authorization", token.clone());
        }
        Ok(req)
    }
}

pub type FeedClient = feed::node_feed_client::NodeFeedClient<InterceptedService<Channel, NodeAuth>>;

async fn channel(url: &str, tls: ClientTlsConfig) -> Result<Channel> {
    Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("feed address {url}"))?
        .tls_config(tls)?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connect to the feed at {url}"))
}

fn client(channel: Channel, auth: NodeAuth) -> FeedClient {
    feed::node_feed_client::NodeFeedClient::with_interceptor(channel, auth)
        // Snapshots of big clusters come in chunks, each well under this.
        .max_decoding_message_size(64 << 20)
}

/// Connects to the feed at `url` (`https://host:port`), trusting `ca_pem`, presenting the
/// bootstrap `token`: enough to register a node ([`join`] does), nothing else.
pub async fn connect(url: &str, ca_pem: &str, token: &str) -> Result<FeedClient> {
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    Ok(client(
        channel(url, tls).await?,
        NodeAuth::bootstrap(token)?,
    ))
}

/// A node's credential on the feed: its client certificate and key (PEM).
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl NodeIdentity {
    /// The node the certificate is for, and whether it is valid now.
    pub fn node(&self) -> Option<(String, bool)> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(self.cert_pem.as_bytes()).ok()?;
        let cert = pem.parse_x509().ok()?;
        Some((node_of(&cert)?, cert.validity().is_valid()))
    }
}

/// The node a client certificate is for: CN `system:node:<name>` in the organisation
/// `system:nodes` (what the feed signs for a node's CSR), or `None`.
pub fn node_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<String> {
    let subject = cert.subject();
    let in_nodes = subject
        .iter_organization()
        .any(|o| o.as_str() == Ok("system:nodes"));
    let cn = subject.iter_common_name().next()?.as_str().ok()?;
    let name = cn.strip_prefix("system:node:")?;
    (in_nodes && !name.is_empty()).then(|| name.to_owned())
}

/// Connects to the feed at `url` as the node whose certificate `identity` is.
pub async fn connect_as_node(
    url: &str,
    ca_pem: &str,
    identity: &NodeIdentity,
) -> Result<FeedClient> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(&identity.cert_pem, &identity.key_pem));
    Ok(client(channel(url, tls).await?, NodeAuth(None)))
}

/// A key for node `name` and a certificate signing request for its client certificate.
pub fn node_csr(name: &str) -> Result<(String, String)> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("system:node:{name}"));
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// Bootstraps a node: registers it with the bootstrap `token` and a fresh key's CSR
/// (retrying until the control plane answers), then connects as the node with the certificate
/// it got. Returns the node's client, the registration's answer, and its identity (keep it:
/// a node that is alive can only register again with it).
pub async fn join(
    url: &str,
    ca_pem: &str,
    token: &str,
    mut request: feed::RegisterRequest,
) -> Result<(FeedClient, feed::RegisterResponse, NodeIdentity)> {
    let (key_pem, csr_pem) = node_csr(&request.node_name)?;
    request.client_csr_pem = csr_pem;
    let mut bootstrap = connect(url, ca_pem, token).await?;
    let registered = session::register(&mut bootstrap, request).await?;
    let identity = NodeIdentity {
        cert_pem: registered.client_cert_pem.clone(),
        key_pem,
    };
    let client = connect_as_node(url, ca_pem, &identity).await?;
    Ok((client, registered, identity))
}
