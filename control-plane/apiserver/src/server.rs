//! Running the API server: TLS with a CA of its own (kept across restarts so kubeconfigs stay
//! valid), bearer-token authentication, a kubeconfig for kubectl, the default namespaces, and
//! periodic compaction of the store's history.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use axum::Router;
use control_plane_store::Store;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::json;

use crate::{
    alloc::{Allocator, Range},
    handlers::{App, handle},
    kubeconfig::Kubeconfig,
    registry::Registry,
    resources::by_kind,
};

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// Where the CA, the token and (by default) the kubeconfig live.
    pub state_dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub service_cidr: String,
    pub node_port_range: String,
    /// Extra names and addresses the serving certificate is valid for.
    pub tls_sans: Vec<String>,
    pub compaction_interval: Duration,
}

/// TLS material and the admin token, created on first start and reused after.
pub struct Credentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub token: String,
    ca_key_pem: String,
}

impl Credentials {
    pub fn load_or_create(config: &Config) -> Result<Self> {
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("create {}", config.state_dir.display()))?;
        let (ca_cert_path, ca_key_path) = (
            config.state_dir.join("ca.crt"),
            config.state_dir.join("ca.key"),
        );
        let (ca_pem, ca_key) = if ca_cert_path.exists() && ca_key_path.exists() {
            (
                std::fs::read_to_string(&ca_cert_path)?,
                std::fs::read_to_string(&ca_key_path)?,
            )
        } else {
            let key = KeyPair::generate()?;
            let cert = ca_params().self_signed(&key)?;
            write_private(&ca_key_path, &key.serialize_pem())?;
            std::fs::write(&ca_cert_path, cert.pem())?;
            (cert.pem(), key.serialize_pem())
        };
        let mut names = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
            "kubernetes".to_owned(),
            "kubernetes.default".to_owned(),
            "kubernetes.default.svc".to_owned(),
            "kubernetes.default.svc.cluster.local".to_owned(),
        ];
        if let Ok(cidr) = Range::cidr(&config.service_cidr) {
            names.push(api_service_ip(cidr).to_string());
        }
        if !config.listen.ip().is_unspecified() {
            names.push(config.listen.ip().to_string());
        }
        names.extend(config.tls_sans.iter().cloned());
        let (cert_pem, key_pem) = issue(&ca_key, "keel-apiserver", &names)?;
        let token_path = config.state_dir.join("token");
        let token = match std::fs::read_to_string(&token_path) {
            Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
            _ => {
                let token: String = (0..32)
                    .map(|_| format!("{:02x}", rand::random::<u8>()))
                    .collect();
                write_private(&token_path, &token)?;
                token
            }
        };
        Ok(Self {
            ca_pem,
            cert_pem,
            key_pem,
            token,
            ca_key_pem: ca_key,
        })
    }

    /// A serving certificate signed by the cluster's CA for `names` (DNS names or addresses),
    /// and its key: what a node's kubelet serves logs with, so the API server can check it.
    pub fn issue(&self, common_name: &str, names: &[String]) -> Result<(String, String)> {
        issue(&self.ca_key_pem, common_name, names)
    }

    /// A kubeconfig for an admin client of `server`.
    pub fn kubeconfig(&self, server: &str) -> Kubeconfig {
        Kubeconfig {
            server: server.to_owned(),
            ca_pem: self.ca_pem.clone(),
            token: self.token.clone(),
        }
    }
}

/// A certificate for `names` signed by the CA whose key is `ca_key`; (certificate, key) PEM.
fn issue(ca_key: &str, common_name: &str, names: &[String]) -> Result<(String, String)> {
    // The same CA parameters and key sign as the stored CA certificate does.
    let issuer = Issuer::new(ca_params(), KeyPair::from_pem(ca_key)?);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n.clone().try_into().map(SanType::DnsName),
        })
        .collect::<Result<_, _>>()?;
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The CA's parameters: fixed, so a restarted server issues as the CA it created before.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "keel-ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    params
}

fn write_private(path: &std::path::Path, content: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    std::io::Write::write_all(&mut file, content.as_bytes())?;
    Ok(())
}

/// Default namespaces, as a fresh cluster has them.
pub const DEFAULT_NAMESPACES: [&str; 4] =
    ["default", "kube-system", "kube-public", "kube-node-lease"];

/// Builds the registry over `store` and the default objects.
pub async fn registry<S: Store>(store: Arc<S>, config: &Config) -> Result<Arc<Registry<S>>> {
    let cidr = Range::cidr(&config.service_cidr).map_err(anyhow::Error::msg)?;
    let ports = Range::ports(&config.node_port_range).map_err(anyhow::Error::msg)?;
    let registry = Arc::new(Registry {
        cluster_ips: Allocator::new(store.clone(), "/registry/ranges/serviceips", cidr, 1),
        node_ports: Allocator::new(store.clone(), "/registry/ranges/servicenodeports", ports, 0),
        store,
    });
    let namespaces = by_kind("", "Namespace").expect("served");
    for ns in DEFAULT_NAMESPACES {
        registry
            .ensure(
                namespaces,
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            )
            .await
            .map_err(|e| anyhow::anyhow!("create namespace {ns}: {}", e.message))?;
    }
    kubernetes_service(&registry, config, cidr)
        .await
        .map_err(|e| anyhow::anyhow!("the default/kubernetes service: {}", e.message))?;
    Ok(registry)
}

/// The first address of the service range: the `kubernetes` service's (skipped by automatic
/// allocation, and in the serving certificate).
fn api_service_ip(cidr: Range) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(cidr.first)
}

/// `default/kubernetes`, the service in-cluster clients reach the API server through (its
/// first service address, port 443), and its EndpointSlice pointing at this server, as
/// kube-apiserver keeps them. Without an address pods can reach to point at (listening on
/// every address, or on loopback, which kube-apiserver refuses to advertise), the service has
/// no endpoints.
async fn kubernetes_service<S: Store>(
    registry: &Registry<S>,
    config: &Config,
    cidr: Range,
) -> crate::error::ApiResult<()> {
    let services = by_kind("", "Service").expect("served");
    let ip = api_service_ip(cidr).to_string();
    registry
        .ensure_in(
            services,
            "default",
            json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
                "spec": {"type": "ClusterIP", "clusterIP": ip,
                    "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": config.listen.port()}]}}),
        )
        .await?;
    if config.listen.ip().is_unspecified() || config.listen.ip().is_loopback() {
        return Ok(());
    }
    let slices = by_kind("discovery.k8s.io", "EndpointSlice").expect("served");
    let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes", "labels": {
            "kubernetes.io/service-name": "kubernetes",
            "endpointslice.kubernetes.io/managed-by": "keel-apiserver"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [config.listen.ip().to_string()], "conditions": {"ready": true}}],
        "ports": [{"name": "https", "port": config.listen.port(), "protocol": "TCP"}]});
    // Created, or brought up to date with this server's address and port.
    match registry
        .create(slices, Some("default"), slice.clone(), false)
        .await
    {
        Err(e) if e.reason == "AlreadyExists" => registry
            .update(slices, Some("default"), "kubernetes", slice, None, false)
            .await
            .map(drop),
        other => other.map(drop),
    }
}

/// The HTTP application (without TLS), for tests and for [`serve`].
pub fn router<S: Store>(
    registry: Arc<Registry<S>>,
    token: String,
    server_address: String,
    kubelets: Option<crate::logs::Kubelets>,
) -> Router {
    let app = Arc::new(App {
        registry,
        tokens: vec![token],
        server_address,
        kubelets,
    });
    Router::new().fallback(handle::<S>).with_state(app)
}

/// Compacts the store's history every `interval`, to the revision seen at the previous tick,
/// so at least one interval of history is kept for watches to resume from.
pub fn spawn_compactor<S: Store>(store: Arc<S>, interval: Duration) {
    tokio::spawn(async move {
        let mut previous = None;
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            if let Some(rev) = previous
                && let Err(e) = store.compact(rev).await
            {
                tracing::warn!("compaction to {rev}: {e}");
            }
            previous = store.revision().await.ok();
        }
    });
}

/// Binds the API's port, writes the kubeconfig, and says where it serves; the returned future
/// serves the API over TLS until the process ends.
pub async fn serve<S: Store>(
    registry: Arc<Registry<S>>,
    credentials: &Credentials,
    config: &Config,
    kubelets: Option<crate::logs::Kubelets>,
) -> Result<impl Future<Output = Result<()>> + use<S>> {
    let host = if config.listen.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        config.listen.ip().to_string()
    };
    let server_url = format!("https://{host}:{}", config.listen.port());
    if let Some(dir) = config.kubeconfig.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    write_private(
        &config.kubeconfig,
        &credentials.kubeconfig(&server_url).render(),
    )?;
    let app = router(
        registry,
        credentials.token.clone(),
        format!("{host}:{}", config.listen.port()),
        kubelets,
    );
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
        credentials.cert_pem.clone().into_bytes(),
        credentials.key_pem.clone().into_bytes(),
    )
    .await
    .context("TLS configuration")?;
    // Bound before saying so: whoever waits for the line can connect at once.
    let listener = std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("listen on {}", config.listen))?;
    listener.set_nonblocking(true)?;
    println!(
        "control-plane: serving the Kubernetes API on {server_url}; kubeconfig: {}",
        config.kubeconfig.display()
    );
    let listen = config.listen;
    Ok(async move {
        axum_server::from_tcp_rustls(listener, tls)
            .serve(app.into_make_service())
            .await
            .with_context(|| format!("serve on {listen}"))
    })
}
