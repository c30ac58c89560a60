//! Authentication: who a request comes from, as kube-apiserver's authenticators name users.
//!
//! - The admin token (the kubeconfig's): `keel-admin`, in `system:masters`.
//! - ServiceAccount tokens: JWTs this server signs (ES256, the key in the state directory,
//!   which every API server of a cluster shares as it shares the CA) for
//!   `system:serviceaccount:<namespace>:<name>`, in `system:serviceaccounts`,
//!   `system:serviceaccounts:<namespace>` and `system:authenticated`. A token is valid while
//!   it has not expired, names this server's issuer and audience, and its service account (and
//!   the pod or secret it is bound to) still exists with the uid it was issued for: deleting
//!   the service account or the pod revokes it, as kube's bound tokens.
//! - Impersonation (`kubectl --as`, `--as-group`): a user allowed to `impersonate` users,
//!   groups or service accounts acts as them.
//!
//! Tokens are compared in constant time; a token that fails any check is simply not a user
//! (401), without saying which check failed.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result};
use axum::http::{HeaderMap, header};
use control_plane_store::Store;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    error::{ApiError, ApiResult},
    rbac::{self, Attributes},
    registry::Registry,
    resources::by_kind,
};

/// The issuer of service account tokens, and the audience the API server accepts (kube's
/// defaults for a cluster whose domain is `cluster.local`).
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// A TokenRequest's lifetime when it asks for none, the shortest it may ask for and the
/// longest it gets.
pub const DEFAULT_TOKEN_SECONDS: i64 = 3600;
pub const MIN_TOKEN_SECONDS: i64 = 600;
pub const MAX_TOKEN_SECONDS: i64 = 365 * 86_400;

/// Who a request comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserInfo {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

pub const AUTHENTICATED: &str = "system:authenticated";
pub const SUPERUSERS: &str = "system:masters";

impl UserInfo {
    /// The holder of the admin token: a cluster administrator.
    pub fn admin() -> Self {
        Self {
            username: "keel-admin".into(),
            uid: String::new(),
            groups: vec![SUPERUSERS.into(), AUTHENTICATED.into()],
            extra: BTreeMap::new(),
        }
    }

    /// A service account's user.
    pub fn service_account(namespace: &str, name: &str, uid: &str) -> Self {
        Self {
            username: format!("system:serviceaccount:{namespace}:{name}"),
            uid: uid.into(),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                AUTHENTICATED.into(),
            ],
            extra: BTreeMap::new(),
        }
    }

    /// In `system:masters`: allowed everything.
    pub fn is_superuser(&self) -> bool {
        self.groups.iter().any(|g| g == SUPERUSERS)
    }

    /// As `status.userInfo` of a SelfSubjectReview writes it.
    pub fn to_json(&self) -> Value {
        let mut info = json!({"username": self.username, "groups": self.groups});
        if !self.uid.is_empty() {
            info["uid"] = json!(self.uid);
        }
        if !self.extra.is_empty() {
            info["extra"] = json!(self.extra);
        }
        info
    }

    /// The (namespace, name) of a service account's username.
    fn service_account_of(username: &str) -> Option<(&str, &str)> {
        username
            .strip_prefix("system:serviceaccount:")?
            .split_once(':')
    }
}

/// The claims of a service account token (kube's names).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Claims {
    aud: Vec<String>,
    exp: i64,
    iat: i64,
    nbf: i64,
    iss: String,
    sub: String,
    jti: String,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Private,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Private {
    namespace: String,
    serviceaccount: Ref,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod: Option<Ref>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret: Option<Ref>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Ref {
    name: String,
    uid: String,
}

/// The key service account tokens are signed with.
#[derive(Clone)]
pub struct ServiceAccountKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
    key_id: String,
}

impl ServiceAccountKey {
    /// The key in `path` (PKCS#8 PEM, P-256), created (0600) when absent.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        let pem = match std::fs::read_to_string(path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pem = rcgen::KeyPair::generate()?.serialize_pem();
                crate::server::write_private(path, &pem)?;
                pem
            }
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        let pair = rcgen::KeyPair::from_pem(&pem)
            .with_context(|| format!("{} does not parse", path.display()))?;
        let public = pair.public_key_pem();
        // kube's key id: the public key's SHA-256, base64url.
        let spki = rcgen::PublicKeyData::subject_public_key_info(&pair);
        let digest = ring::digest::digest(&ring::digest::SHA256, &spki);
        let key_id = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            digest.as_ref(),
        );
        Ok(Self {
            encoding: EncodingKey::from_ec_pem(pem.as_bytes())
                .with_context(|| format!("{} is not a P-256 key", path.display()))?,
            decoding: DecodingKey::from_ec_pem(public.as_bytes())?,
            key_id,
        })
    }

    fn sign(&self, claims: &Claims) -> ApiResult<String> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).map_err(ApiError::internal)
    }

    fn verify(&self, token: &str) -> Option<Claims> {
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[ISSUER]);
        validation.validate_nbf = true;
        validation.leeway = 0;
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .ok()
            .map(|t| t.claims)
    }
}

/// How requests are authenticated.
pub struct Authenticator {
    pub admin_token: String,
    pub service_accounts: ServiceAccountKey,
}

impl Authenticator {
    /// The user a request's bearer token names, if it names one.
    pub async fn authenticate<S: Store>(
        &self,
        registry: &Registry<S>,
        headers: &HeaderMap,
    ) -> Option<UserInfo> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))?
            .trim();
        if crate::server::same_secret(token, &self.admin_token) {
            return Some(UserInfo::admin());
        }
        // A JWT has two dots; anything else is no user.
        if token.matches('.').count() != 2 {
            return None;
        }
        let claims = self.service_accounts.verify(token)?;
        self.still_valid(registry, &claims).await
    }

    /// The user of a verified token whose service account (and bound object) still exist
    /// with the uids it was issued for.
    async fn still_valid<S: Store>(
        &self,
        registry: &Registry<S>,
        claims: &Claims,
    ) -> Option<UserInfo> {
        let private = &claims.kubernetes;
        let ns = private.namespace.as_str();
        live(registry, "ServiceAccount", ns, &private.serviceaccount).await?;
        let mut user = UserInfo::service_account(
            ns,
            &private.serviceaccount.name,
            &private.serviceaccount.uid,
        );
        if let Some(pod) = &private.pod {
            live(registry, "Pod", ns, pod).await?;
            user.extra.insert(
                "authentication.kubernetes.io/pod-name".into(),
                vec![pod.name.clone()],
            );
            user.extra.insert(
                "authentication.kubernetes.io/pod-uid".into(),
                vec![pod.uid.clone()],
            );
        }
        if let Some(secret) = &private.secret {
            live(registry, "Secret", ns, secret).await?;
        }
        user.extra.insert(
            "authentication.kubernetes.io/credential-id".into(),
            vec![format!("JTI={}", claims.jti)],
        );
        Some(user)
    }

    /// A TokenRequest (`POST .../serviceaccounts/<name>/token`) answered: a token for the
    /// service account, bound to the pod or secret it names, for the time it asks
    /// ([`MIN_TOKEN_SECONDS`] to [`MAX_TOKEN_SECONDS`], [`DEFAULT_TOKEN_SECONDS`] if it asks
    /// none).
    pub async fn token_request<S: Store>(
        &self,
        registry: &Registry<S>,
        namespace: &str,
        name: &str,
        request: Value,
        dry_run: bool,
    ) -> ApiResult<Value> {
        let accounts = by_kind("", "ServiceAccount").expect("served");
        let account = registry.get(accounts, Some(namespace), name).await?;
        let uid = |obj: &Value| {
            obj.pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let spec = request.get("spec").cloned().unwrap_or(json!({}));
        let invalid = |field: &str, value: Value, why: &str| {
            ApiError::invalid(
                "authentication.k8s.io",
                "TokenRequest",
                name,
                vec![crate::error::Cause::invalid(field, value, why)],
            )
        };
        let seconds = match spec.get("expirationSeconds") {
            None | Some(Value::Null) => DEFAULT_TOKEN_SECONDS,
            Some(v) => match v.as_i64() {
                Some(s) if s < MIN_TOKEN_SECONDS => {
                    return Err(invalid(
                        "spec.expirationSeconds",
                        v.clone(),
                        "may not specify a duration less than 10 minutes",
                    ));
                }
                Some(s) if s > 1 << 32 => {
                    return Err(invalid(
                        "spec.expirationSeconds",
                        v.clone(),
                        "may not specify a duration larger than 2^32 seconds",
                    ));
                }
                Some(s) => s.min(MAX_TOKEN_SECONDS),
                None => {
                    return Err(invalid(
                        "spec.expirationSeconds",
                        v.clone(),
                        "must be an integer",
                    ));
                }
            },
        };
        let audiences: Vec<String> = match spec.get("audiences").and_then(Value::as_array) {
            Some(list) if !list.is_empty() => list
                .iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect(),
            _ => vec![ISSUER.to_owned()],
        };
        let (mut pod, mut secret) = (None, None);
        if let Some(bound) = spec.get("boundObjectRef").filter(|b| !b.is_null()) {
            let kind = bound
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let bound_name = bound
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !matches!(kind, "Pod" | "Secret") {
                return Err(invalid(
                    "spec.boundObjectRef.kind",
                    json!(kind),
                    "supported values: \"Pod\", \"Secret\"",
                ));
            }
            let def = by_kind("", kind).expect("served");
            let obj = registry.get(def, Some(namespace), bound_name).await?;
            let wanted_uid = bound.get("uid").and_then(Value::as_str).unwrap_or_default();
            if !wanted_uid.is_empty() && wanted_uid != uid(&obj) {
                return Err(ApiError::conflict_message(
                    crate::error::Subject {
                        group: "",
                        resource: def.plural,
                        name: bound_name,
                    },
                    format!(
                        "the UID in the bound object reference ({wanted_uid}) does not match the UID in record ({})",
                        uid(&obj)
                    ),
                ));
            }
            let r = Ref {
                name: bound_name.into(),
                uid: uid(&obj),
            };
            if kind == "Pod" {
                pod = Some(r);
            } else {
                secret = Some(r);
            }
        }
        let now = jiff::Timestamp::now().as_second();
        let claims = Claims {
            aud: audiences.clone(),
            exp: now + seconds,
            iat: now,
            nbf: now,
            iss: ISSUER.into(),
            sub: format!("system:serviceaccount:{namespace}:{name}"),
            jti: uuid::Uuid::new_v4().to_string(),
            kubernetes: Private {
                namespace: namespace.into(),
                serviceaccount: Ref {
                    name: name.into(),
                    uid: uid(&account),
                },
                pod,
                secret,
            },
        };
        let token = if dry_run {
            String::new()
        } else {
            self.service_accounts.sign(&claims)?
        };
        let expires = jiff::Timestamp::from_second(claims.exp)
            .map_err(ApiError::internal)?
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let mut spec = spec;
        spec["audiences"] = json!(audiences);
        spec["expirationSeconds"] = json!(seconds);
        Ok(json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "metadata": {"name": name, "namespace": namespace,
                "creationTimestamp": jiff::Timestamp::from_second(now).map_err(ApiError::internal)?
                    .strftime("%Y-%m-%dT%H:%M:%SZ").to_string()},
            "spec": spec,
            "status": {"token": token, "expirationTimestamp": expires},
        }))
    }
}

/// Whether the object a token names exists with its uid, not being deleted.
async fn live<S: Store>(registry: &Registry<S>, kind: &str, ns: &str, r: &Ref) -> Option<()> {
    let def = by_kind("", kind).expect("served");
    let obj = registry.get(def, Some(ns), &r.name).await.ok()?;
    let uid = obj.pointer("/metadata/uid").and_then(Value::as_str);
    let deleting = obj.pointer("/metadata/deletionTimestamp").is_some();
    (uid == Some(r.uid.as_str()) && !deleting).then_some(())
}

/// The user a request acts as: `user`, or whom its `Impersonate-*` headers name when `user`
/// may impersonate them (kube's impersonation filter: `impersonate` on `users`, `groups`,
/// `serviceaccounts`, `uids`, and on `userextras/<key>`).
pub async fn impersonated<S: Store>(
    registry: &Registry<S>,
    user: UserInfo,
    headers: &HeaderMap,
) -> ApiResult<UserInfo> {
    let values = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect()
    };
    let target_user = values("impersonate-user").into_iter().next();
    let groups = values("impersonate-group");
    let uid = values("impersonate-uid").into_iter().next();
    let extras: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(k, v)| {
            let key = k.as_str().strip_prefix("impersonate-extra-")?;
            Some((
                crate::handlers::percent_decode(key),
                v.to_str().ok()?.to_owned(),
            ))
        })
        .collect();
    let Some(username) = target_user else {
        if groups.is_empty() && uid.is_none() && extras.is_empty() {
            return Ok(user);
        }
        return Err(ApiError::bad_request(
            "requested impersonation of groups, a uid or extra fields without impersonating a user",
        ));
    };
    let check = |attrs: Attributes| {
        let user = &user;
        async move {
            if rbac::allowed(registry, user, &attrs).await? {
                Ok(())
            } else {
                Err(rbac::forbidden(user, &attrs))
            }
        }
    };
    let impersonate = |group: &str, resource: &str, namespace: &str, name: &str| Attributes {
        verb: "impersonate".into(),
        api_group: group.into(),
        resource: resource.into(),
        namespace: namespace.into(),
        name: name.into(),
        ..Attributes::default()
    };
    let mut target = match UserInfo::service_account_of(&username) {
        Some((ns, name)) => {
            check(impersonate("", "serviceaccounts", ns, name)).await?;
            let mut sa = UserInfo::service_account(ns, name, "");
            if !groups.is_empty() {
                sa.groups = Vec::new();
            }
            sa
        }
        None => {
            check(impersonate("", "users", "", &username)).await?;
            UserInfo {
                username: username.clone(),
                uid: String::new(),
                groups: Vec::new(),
                extra: BTreeMap::new(),
            }
        }
    };
    for group in groups {
        check(impersonate("", "groups", "", &group)).await?;
        if !target.groups.contains(&group) {
            target.groups.push(group);
        }
    }
    if let Some(uid) = uid {
        check(impersonate("authentication.k8s.io", "uids", "", &uid)).await?;
        target.uid = uid;
    }
    for (key, value) in extras {
        let mut attrs = impersonate("authentication.k8s.io", "userextras", "", &value);
        attrs.subresource = key.clone();
        check(attrs).await?;
        target.extra.entry(key).or_default().push(value);
    }
    if username != "system:anonymous" && !target.groups.iter().any(|g| g == AUTHENTICATED) {
        target.groups.push(AUTHENTICATED.into());
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_as_issued() {
        let dir = tempfile::tempdir().unwrap();
        let key = ServiceAccountKey::load_or_create(&dir.path().join("sa.key")).unwrap();
        let again = ServiceAccountKey::load_or_create(&dir.path().join("sa.key")).unwrap();
        assert_eq!(key.key_id, again.key_id, "the key is kept across starts");
        let now = jiff::Timestamp::now().as_second();
        let claims = |aud: &str, exp: i64| Claims {
            aud: vec![aud.into()],
            exp,
            iat: now,
            nbf: now,
            iss: ISSUER.into(),
            sub: "system:serviceaccount:a:b".into(),
            jti: "j".into(),
            kubernetes: Private {
                namespace: "a".into(),
                serviceaccount: Ref {
                    name: "b".into(),
                    uid: "u".into(),
                },
                pod: None,
                secret: None,
            },
        };
        let good = key.sign(&claims(ISSUER, now + 600)).unwrap();
        assert_eq!(
            again.verify(&good).unwrap().sub,
            "system:serviceaccount:a:b"
        );
        assert!(
            key.verify(&key.sign(&claims("vault", now + 600)).unwrap())
                .is_none()
        );
        assert!(
            key.verify(&key.sign(&claims(ISSUER, now - 1)).unwrap())
                .is_none()
        );
        let other = ServiceAccountKey::load_or_create(&dir.path().join("other.key")).unwrap();
        assert!(other.verify(&good).is_none(), "another cluster's key");
        let mut forged = good.clone();
        forged.replace_range(good.len() - 4.., "AAAA");
        assert!(key.verify(&forged).is_none());
    }
}
