//! Running the API server: TLS with a CA of its own (kept across restarts so kubeconfigs stay
//! valid), bearer-token authentication, a kubeconfig for kubectl, the default namespaces, and
//! periodic compaction of the store's history.
//!
//! Credentials live in the state directory (0700): the CA (ten years from its creation), the
//! admin token, the key service account tokens are signed with (`service-account.key`) and
//! the kubeconfig, each written atomically (a temporary file, fsync, rename). A second API
//! server of the same cluster needs copies of the CA, the tokens and that key.
//! A CA that does not load (a key that does not parse or match its certificate, a certificate
//! without its key, an expired CA) stops the server with the reason: it is never replaced
//! silently, since every kubeconfig and node credential trusts it. Serving certificates live a
//! year and are issued again at every start and, while running, after two thirds of that.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use axum::Router;
use control_plane_store::Store;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::json;

pub use control_plane_api::files::{create_private_dir, write_atomically, write_private};

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
    /// Requests other than watches served at once (then 429), as kube-apiserver's
    /// `--max-requests-inflight` plus `--max-mutating-requests-inflight` (400 + 200).
    pub max_requests_inflight: usize,
    /// Watches (and followed logs) one client address may hold open (then 429).
    pub max_watches_per_client: usize,
}

/// How long the CA lives from its creation.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);
/// How long a certificate the CA issues lives.
pub const CERT_LIFETIME: Duration = Duration::from_secs(365 * 86_400);

/// TLS material and the admin token, created on first start and reused after.
#[derive(Clone)]
pub struct Credentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub token: String,
    /// What service account tokens are signed with (`service-account.key`; every API server
    /// of a cluster needs the same, as the CA).
    pub service_accounts: crate::auth::ServiceAccountKey,
    ca_key_pem: String,
    /// What the serving certificate is for (reissued with the same names).
    names: Vec<String>,
}

/// A file's content, `None` if it does not exist.
fn read_if_exists(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// The CA of `dir` (certificate, key), created when neither file exists.
fn load_or_create_ca(dir: &Path) -> Result<(String, String)> {
    let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
    let refuse = |why: String| {
        anyhow::anyhow!(
            "{why}: refusing to replace the cluster's CA (every kubeconfig and node trusts it). \
             Restore the files, or remove both {} and {} to create a new CA.",
            cert_path.display(),
            key_path.display()
        )
    };
    let new_cert = |key: &KeyPair| -> Result<String> {
        let now = time::OffsetDateTime::now_utc();
        let mut params = ca_params();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + CA_LIFETIME;
        let pem = params.self_signed(key)?.pem();
        write_atomically(&cert_path, &pem, 0o644)?;
        Ok(pem)
    };
    match (read_if_exists(&cert_path)?, read_if_exists(&key_path)?) {
        (None, None) => {
            let key = KeyPair::generate()?;
            // The key first: a start interrupted after it makes the certificate again.
            write_private(&key_path, &key.serialize_pem())?;
            Ok((new_cert(&key)?, key.serialize_pem()))
        }
        (None, Some(key_pem)) => {
            let key = KeyPair::from_pem(&key_pem)
                .map_err(|e| refuse(format!("{} does not parse ({e})", key_path.display())))?;
            Ok((new_cert(&key)?, key_pem))
        }
        (Some(_), None) => Err(refuse(format!(
            "{} exists without its key {}",
            cert_path.display(),
            key_path.display()
        ))),
        (Some(cert_pem), Some(key_pem)) => {
            let key = KeyPair::from_pem(&key_pem)
                .map_err(|e| refuse(format!("{} does not parse ({e})", key_path.display())))?;
            let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
                .map_err(|e| refuse(format!("{} does not parse ({e})", cert_path.display())))?;
            let cert = pem
                .parse_x509()
                .map_err(|e| refuse(format!("{} does not parse ({e})", cert_path.display())))?;
            if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                return Err(refuse(format!(
                    "{} is not the key of {}",
                    key_path.display(),
                    cert_path.display()
                )));
            }
            if !cert.validity().is_valid() {
                return Err(refuse(format!(
                    "the CA in {} is valid from {} to {}, not now",
                    cert_path.display(),
                    cert.validity().not_before,
                    cert.validity().not_after
                )));
            }
            Ok((cert_pem, key_pem))
        }
    }
}

impl Credentials {
    pub fn load_or_create(config: &Config) -> Result<Self> {
        create_private_dir(&config.state_dir)?;
        let (ca_pem, ca_key) = load_or_create_ca(&config.state_dir)?;
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
        let (cert_pem, key_pem) = issue(&ca_pem, &ca_key, "keel-apiserver", &names)?;
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
        let service_accounts = crate::auth::ServiceAccountKey::load_or_create(
            &config.state_dir.join("service-account.key"),
        )?;
        Ok(Self {
            ca_pem,
            cert_pem,
            key_pem,
            token,
            service_accounts,
            ca_key_pem: ca_key,
            names,
        })
    }

    /// A serving certificate signed by the cluster's CA for `names` (DNS names or addresses),
    /// and its key: what a node's kubelet serves logs with, so the API server can check it.
    pub fn issue(&self, common_name: &str, names: &[String]) -> Result<(String, String)> {
        issue(&self.ca_pem, &self.ca_key_pem, common_name, names)
    }

    /// Signs a node's client certificate from its CSR (PEM, its signature checked): CN
    /// `system:node:<node>`, O `system:nodes`, client authentication only, [`CERT_LIFETIME`],
    /// whatever else the CSR asked for.
    pub fn sign_node_client(&self, csr_pem: &str, node: &str) -> Result<String> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .context("the certificate signing request does not parse or its signature fails")?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("system:node:{node}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "system:nodes");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + CERT_LIFETIME;
        csr.params = params;
        let issuer = Issuer::from_ca_cert_pem(&self.ca_pem, KeyPair::from_pem(&self.ca_key_pem)?)?;
        Ok(csr.signed_by(&issuer)?.pem())
    }

    /// A new serving certificate for the API server (the same names), and its key.
    pub fn reissue_serving(&self) -> Result<(String, String)> {
        self.issue("keel-apiserver", &self.names)
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

/// A certificate for `names`, living [`CERT_LIFETIME`], signed by the CA `ca` whose key is
/// `ca_key`; (certificate, key) PEM.
fn issue(ca: &str, ca_key: &str, common_name: &str, names: &[String]) -> Result<(String, String)> {
    let issuer = Issuer::from_ca_cert_pem(ca, KeyPair::from_pem(ca_key)?)?;
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
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1); // clocks a little behind
    params.not_after = now + CERT_LIFETIME;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The CA's parameters (its validity is set when it is made).
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
    params
}

/// Whether a presented secret (a token) is the expected one, in time that does not depend on
/// where they differ.
pub fn same_secret(presented: &str, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    presented.as_bytes().ct_eq(expected.as_bytes()).into()
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
    for (kind, object) in crate::rbac::defaults() {
        let def = by_kind(crate::rbac::GROUP, kind).expect("served");
        registry
            .ensure(def, object)
            .await
            .map_err(|e| anyhow::anyhow!("the default {kind}s: {}", e.message))?;
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
    service_accounts: crate::auth::ServiceAccountKey,
    server_address: String,
    kubelets: Option<crate::logs::Kubelets>,
    limits: crate::handlers::Limits,
) -> Router {
    let app = Arc::new(App {
        registry,
        auth: crate::auth::Authenticator {
            admin_token: token,
            service_accounts,
        },
        server_address,
        kubelets,
        limits,
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
                tracing::warn!(revision = %rev, error = %e, "compaction failed");
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
        credentials.service_accounts.clone(),
        format!("{host}:{}", config.listen.port()),
        kubelets,
        crate::handlers::Limits::new(config.max_requests_inflight, config.max_watches_per_client),
    );
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
        credentials.cert_pem.clone().into_bytes(),
        credentials.key_pem.clone().into_bytes(),
    )
    .await
    .context("TLS configuration")?;
    // A fresh serving certificate after two thirds of the last one's life.
    let (rotating, credentials) = (tls.clone(), credentials.clone());
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(CERT_LIFETIME * 2 / 3).await;
            let reloaded = match credentials.reissue_serving() {
                Ok((cert, key)) => rotating
                    .reload_from_pem(cert.into_bytes(), key.into_bytes())
                    .await
                    .map_err(anyhow::Error::from),
                Err(e) => Err(e),
            };
            match reloaded {
                Ok(()) => tracing::info!("serving certificate renewed"),
                Err(e) => tracing::error!(
                    error = format!("{e:#}"),
                    "renewing the serving certificate failed"
                ),
            }
        }
    });
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
        let mut server = axum_server::from_tcp_rustls(listener, tls);
        // A client gets 30 s to send its request's headers (and 10 s for the TLS handshake,
        // axum-server's default); the body's time is the handler's.
        server
            .http_builder()
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30));
        server
            .serve(app.into_make_service_with_connect_info::<SocketAddr>())
            .await
            .with_context(|| format!("serve on {listen}"))
    })
}
