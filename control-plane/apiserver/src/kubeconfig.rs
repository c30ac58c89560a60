//! The kubeconfig the server writes for its admin (kubectl reads it as it is), and reading it
//! back for the project's own clients (tests, benchmarks, node agents on one machine).

use anyhow::{Context, Result, bail};
use base64::Engine;

/// One cluster, one user, one context: what a kubeconfig of this server holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kubeconfig {
    /// `https://host:port`
    pub server: String,
    /// The CA certificate that signed the server's certificate, PEM.
    pub ca_pem: String,
    /// The bearer token.
    pub token: String,
}

impl Kubeconfig {
    pub fn render(&self) -> String {
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: keel\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\nusers:\n- name: admin\n  user:\n    token: {}\ncontexts:\n- name: keel\n  context:\n    cluster: keel\n    user: admin\n    namespace: default\ncurrent-context: keel\n",
            self.server, self.token
        )
    }

    /// Parses what [`Kubeconfig::render`] writes (not kubeconfigs in general).
    pub fn parse(text: &str) -> Result<Self> {
        let field = |name: &str| -> Result<&str> {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(": "))
                .with_context(|| format!("no {name} in the kubeconfig"))
        };
        let ca = base64::engine::general_purpose::STANDARD
            .decode(field("certificate-authority-data")?)
            .context("certificate-authority-data is not base64")?;
        let kubeconfig = Self {
            server: field("server")?.to_owned(),
            ca_pem: String::from_utf8(ca).context("the CA is not PEM text")?,
            token: field("token")?.to_owned(),
        };
        if !kubeconfig.server.starts_with("https://") {
            bail!("the server {} is not an https URL", kubeconfig.server);
        }
        Ok(kubeconfig)
    }

    pub fn read(path: &std::path::Path) -> Result<Self> {
        Self::parse(
            &std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_rendered_parses_back() {
        let k = Kubeconfig {
            server: "https://127.0.0.1:6443".into(),
            ca_pem: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
            token: "abc123".into(),
        };
        assert_eq!(Kubeconfig::parse(&k.render()).unwrap(), k);
        assert!(Kubeconfig::parse("apiVersion: v1\n").is_err());
    }
}
