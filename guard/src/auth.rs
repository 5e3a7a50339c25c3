//! Bearer tokens (SPEC: HTTP API, auth): JWTs signed with HS256 (a shared secret) or with an
//! asymmetric key (EdDSA with Ed25519, or RS256), claims `sub`, `tenant`, `scope`
//! (space-separated: `metrics` for a tenant's data, `operator` for the fleet and every
//! tenant) and `exp`.
//!
//! A lease owner's token (AEP-64, see [`crate::leases`]) carries instead `iss` (the owner's
//! Akash account), `iat`, `version: v1` and a `leases` claim, and reaches that owner's leases as
//! the claim says; a token is one or the other (one with `leases` and a `tenant` or `scope` is
//! refused).
//!
//! Checked: the signature against every configured key of the token's algorithm, `exp` and
//! `nbf` when present (with a leeway for clock skew), `aud` when the sink is given an audience
//! (`--jwt-audience`: tokens of an identity provider that serves several services), and that
//! the algorithm is one configured — `alg: none` and an HS256 token made with a public key as
//! its secret are refused.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::leases::{Grant, LeaseId, Leases, is_account};
use crate::owner_keys::OwnerKeys;

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY_S: u64 = 30;

/// The claims of a Meterflow token, or of a lease owner's (AEP-64).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who the token was given to (a person, a service); required but in a lease owner's.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sub: String,
    /// The tenant whose data a `metrics` token reaches; empty for an operator token.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant: String,
    /// Space-separated scopes: `metrics`, `operator` (none: the token reaches nothing).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scope: String,
    /// Expiry, in seconds since the epoch.
    pub exp: u64,
    /// A lease owner's token: the owner's Akash account, which is the tenant it reaches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// A lease owner's token: when it was issued, in seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// A lease owner's token: `v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// A lease owner's token: which leases, at which providers, for which scopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leases: Option<Leases>,
}

impl Claims {
    /// Whether the token carries `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scope.split_whitespace().any(|s| s == scope)
    }

    /// The lease owner whose token this is, with its `leases` claim (AEP-64).
    pub fn lease_owner(&self) -> Option<(&str, &Leases)> {
        Some((self.iss.as_deref()?, self.leases.as_ref()?))
    }

    /// The tenant a tenant's token is for (a lease owner's: its account); empty for an
    /// operator's.
    pub fn own_tenant(&self) -> &str {
        self.lease_owner().map_or(&self.tenant, |(owner, _)| owner)
    }

    /// Whether the token reaches all of `tenant`'s data at `provider` (the sink's): an
    /// operator reaches every tenant; a tenant token with the `metrics` scope its own; a lease
    /// owner's its owner's when its `leases` claim reaches every lease there.
    pub fn reaches(&self, tenant: &str, provider: &str) -> bool {
        match self.lease_owner() {
            Some((owner, leases)) => owner == tenant && leases.reaches_all(provider),
            None => {
                self.has_scope("operator")
                    || (self.has_scope("metrics")
                        && !self.tenant.is_empty()
                        && self.tenant == tenant)
            }
        }
    }

    /// What the token reaches of `tenant`'s lease `lease` at `provider`.
    pub fn reaches_lease(&self, tenant: &str, lease: &str, provider: &str) -> Grant {
        match self.lease_owner() {
            Some((owner, leases)) if owner == tenant => {
                leases.grant(provider, LeaseId::parse(lease))
            }
            Some(_) => Grant::Nothing,
            None if self.reaches(tenant, provider) => Grant::Lease,
            None => Grant::Nothing,
        }
    }

    /// Whether the token may read metrics at all: the `metrics` or `operator` scope, or a
    /// lease owner's token reaching some lease's metrics at `provider`.
    pub fn reads_metrics(&self, provider: &str) -> bool {
        match self.lease_owner() {
            Some((_, leases)) => leases.reaches_any(provider),
            None => self.has_scope("metrics") || self.has_scope("operator"),
        }
    }

    /// The checks beyond the signature and the times: a Meterflow token names its subject
    /// (one without a scope is valid and reaches nothing); a lease owner's is AEP-64's (an Akash account as `iss`, `iat`, `v1`, a
    /// `leases` claim the provider accepts) and is nothing else.
    fn validate(&self) -> Result<(), String> {
        let Some(leases) = &self.leases else {
            if self.sub.is_empty() {
                return Err("a token needs sub (or, a lease owner's, leases)".into());
            }
            return Ok(());
        };
        if !self.tenant.is_empty() || !self.scope.is_empty() {
            return Err("a lease owner's token has no tenant or scope claim".into());
        }
        if !self.iss.as_deref().is_some_and(is_account) {
            return Err("a lease owner's token is issued by an Akash account (iss)".into());
        }
        if self.iat.is_none() {
            return Err("a lease owner's token says when it was issued (iat)".into());
        }
        if self.version.as_deref() != Some("v1") {
            return Err("a lease owner's token is version v1".into());
        }
        leases.validate()
    }
}

/// A key a token is checked with, and the checks (built once, at start-up).
#[derive(Clone)]
pub struct VerifyingKey {
    pub algorithm: Algorithm,
    pub key: DecodingKey,
    validation: Validation,
}

impl VerifyingKey {
    fn new(algorithm: Algorithm, key: DecodingKey) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_S;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        Self {
            algorithm,
            key,
            validation,
        }
    }
}

/// Why a key or a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{what}: {source}")]
    Key {
        what: String,
        source: jsonwebtoken::errors::Error,
    },
    #[error(
        "{path}: neither an Ed25519 nor an RSA key in PEM (give a file that starts with -----BEGIN PUBLIC KEY----- or -----BEGIN PRIVATE KEY-----)"
    )]
    UnknownKey { path: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the HS256 secret in {path} is {len} bytes; use at least 32 random bytes")]
    ShortSecret { path: String, len: usize },
    #[error(
        "{path}: {why} (one lease owner's public key a line, base64 as `akash query auth account` shows it)"
    )]
    OwnerKeys { path: String, why: String },
}

/// How the sink checks tokens.
#[derive(Clone, Default)]
pub struct Auth {
    keys: Vec<VerifyingKey>,
    /// Lease owners' account keys, for their own `ES256K` tokens.
    owners: Option<std::sync::Arc<OwnerKeys>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algorithms: Vec<_> = self.keys.iter().map(|k| k.algorithm).collect();
        f.debug_struct("Auth")
            .field("keys", &algorithms)
            .field("owners", &self.owners)
            .finish()
    }
}

/// The shortest HS256 secret accepted (RFC 7518: at least the hash's size).
pub const MIN_SECRET_BYTES: usize = 32;

impl Auth {
    /// Tokens signed with any of `keys` are accepted. With no keys, every request that needs a
    /// token is refused (use [`Auth::hs256`] or a public key).
    pub fn new(keys: Vec<VerifyingKey>) -> Self {
        Self { keys, owners: None }
    }

    /// The same checks, and lease owners' tokens signed with their own account keys
    /// (`ES256K`, see [`crate::owner_keys`]). The audience is not asked of those: AEP-64's
    /// tokens have none.
    pub fn with_owner_keys(mut self, owners: OwnerKeys) -> Self {
        self.owners = Some(std::sync::Arc::new(owners));
        self
    }

    /// Accepts HS256 tokens made with `secret`.
    pub fn hs256(secret: &[u8]) -> VerifyingKey {
        VerifyingKey::new(Algorithm::HS256, DecodingKey::from_secret(secret))
    }

    /// Reads an HS256 secret file (its bytes, a trailing newline dropped).
    pub fn secret_file(path: &std::path::Path) -> Result<Vec<u8>, AuthError> {
        let mut secret = std::fs::read(path).map_err(|source| AuthError::Read {
            path: path.display().to_string(),
            source,
        })?;
        while secret.last().is_some_and(|b| b.is_ascii_whitespace()) {
            secret.pop();
        }
        if secret.len() < MIN_SECRET_BYTES {
            return Err(AuthError::ShortSecret {
                path: path.display().to_string(),
                len: secret.len(),
            });
        }
        Ok(secret)
    }

    /// A public key in PEM: Ed25519 (tokens with `alg: EdDSA`) or RSA (`alg: RS256`).
    pub fn public_key_pem(pem: &[u8], path: &str) -> Result<VerifyingKey, AuthError> {
        if let Ok(key) = DecodingKey::from_ed_pem(pem) {
            return Ok(VerifyingKey::new(Algorithm::EdDSA, key));
        }
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(VerifyingKey::new(Algorithm::RS256, key));
        }
        Err(AuthError::UnknownKey {
            path: path.to_string(),
        })
    }

    /// Reads a public key file (see [`Auth::public_key_pem`]).
    pub fn public_key_file(path: &std::path::Path) -> Result<VerifyingKey, AuthError> {
        let pem = std::fs::read(path).map_err(|source| AuthError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::public_key_pem(&pem, &path.display().to_string())
    }

    /// The same checks, and a token must name `audience` in its `aud` claim (a string or a
    /// list); one without `aud`, or for another audience, is refused.
    pub fn with_audience(mut self, audience: Option<&str>) -> Self {
        if let Some(aud) = audience {
            for k in &mut self.keys {
                k.validation.validate_aud = true;
                k.validation.set_audience(&[aud]);
                k.validation.set_required_spec_claims(&["exp", "aud"]);
            }
        }
        self
    }

    /// The claims of a valid token; `None` for a missing, malformed, expired, wrongly signed
    /// or otherwise refused one.
    pub fn check(&self, token: &str) -> Option<Claims> {
        let claims = match jsonwebtoken::decode_header(token) {
            Ok(header) => self
                .keys
                .iter()
                .filter(|k| k.algorithm == header.alg)
                .find_map(|k| {
                    jsonwebtoken::decode::<Claims>(token, &k.key, &k.validation)
                        .ok()
                        .map(|data| data.claims)
                }),
            // An algorithm jsonwebtoken does not know: a lease owner's ES256K, if any.
            Err(_) => self.owners.as_ref().and_then(|o| o.check(token)),
        };
        claims.filter(|claims| claims.validate().is_ok())
    }
}

/// A key tokens are minted with (`meterflow token`, the demo).
pub enum SigningKey {
    Hs256(Vec<u8>),
    /// A private key in PEM: Ed25519 or RSA.
    Pem(Vec<u8>),
}

/// Mints a token for `claims`.
pub fn mint(key: &SigningKey, claims: &Claims) -> Result<String, AuthError> {
    mint_for(key, claims, None)
}

/// Mints a token for `claims`, for `audience` (the `aud` claim) when given.
pub fn mint_for(
    key: &SigningKey,
    claims: &Claims,
    audience: Option<&str>,
) -> Result<String, AuthError> {
    let mut body = serde_json::to_value(claims).expect("claims are JSON");
    if let (Some(aud), Some(map)) = (audience, body.as_object_mut()) {
        map.insert("aud".into(), aud.into());
    }
    let (algorithm, key) = match key {
        SigningKey::Hs256(secret) => (Algorithm::HS256, EncodingKey::from_secret(secret)),
        SigningKey::Pem(pem) => match EncodingKey::from_ed_pem(pem) {
            Ok(k) => (Algorithm::EdDSA, k),
            Err(_) => (
                Algorithm::RS256,
                EncodingKey::from_rsa_pem(pem).map_err(|_| AuthError::UnknownKey {
                    path: "the private key".into(),
                })?,
            ),
        },
    };
    jsonwebtoken::encode(&Header::new(algorithm), &body, &key).map_err(|source| AuthError::Key {
        what: "cannot sign the token".into(),
        source,
    })
}

/// Seconds since the epoch, for `exp`.
pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn claims(tenant: &str, scope: &str, exp: u64) -> Claims {
        Claims {
            sub: "someone".into(),
            tenant: tenant.into(),
            scope: scope.into(),
            exp,
            ..Claims::default()
        }
    }

    #[test]
    fn a_token_is_accepted_only_signed_with_a_configured_key_and_unexpired() {
        let auth = Auth::new(vec![Auth::hs256(SECRET)]);
        let good = claims("acme", "metrics", now_s() + 600);
        let token = mint(&SigningKey::Hs256(SECRET.to_vec()), &good).expect("mints");
        assert_eq!(auth.check(&token), Some(good.clone()));
        let other = mint(
            &SigningKey::Hs256(b"another secret of 32 bytes......".to_vec()),
            &good,
        )
        .expect("mints");
        assert_eq!(auth.check(&other), None);
        // Expired beyond the leeway; within it, still accepted.
        let old = claims("acme", "metrics", now_s() - LEEWAY_S - 5);
        let old = mint(&SigningKey::Hs256(SECRET.to_vec()), &old).expect("mints");
        assert_eq!(auth.check(&old), None);
        let skewed = claims("acme", "metrics", now_s() - 5);
        let skewed = mint(&SigningKey::Hs256(SECRET.to_vec()), &skewed).expect("mints");
        assert!(auth.check(&skewed).is_some());
        // `alg: none`: the same claims, unsigned.
        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(serde_json::to_string(&good).expect("json").as_bytes())
        );
        assert_eq!(auth.check(&none), None);
        assert_eq!(auth.check("not a token"), None);
        assert_eq!(Auth::default().check(&token), None);
    }

    /// Signs any claims, as an identity provider would.
    fn signed(body: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &body,
            &EncodingKey::from_secret(SECRET),
        )
        .expect("signs")
    }

    #[test]
    fn an_audience_when_configured_must_be_the_tokens_and_nbf_is_honoured_with_the_leeway() {
        let good = claims("acme", "metrics", now_s() + 600);
        let key = SigningKey::Hs256(SECRET.to_vec());
        let plain = Auth::new(vec![Auth::hs256(SECRET)]);
        let strict = Auth::new(vec![Auth::hs256(SECRET)]).with_audience(Some("meterflow"));
        let ours = mint_for(&key, &good, Some("meterflow")).expect("mints");
        let theirs = mint_for(&key, &good, Some("grafana")).expect("mints");
        let none = mint(&key, &good).expect("mints");
        assert_eq!(strict.check(&ours), Some(good.clone()));
        assert_eq!(strict.check(&theirs), None, "another service's token");
        assert_eq!(
            strict.check(&none),
            None,
            "a token for no audience in particular"
        );
        let listed = serde_json::json!({"sub": "s", "tenant": "acme", "scope": "metrics",
            "exp": now_s() + 600, "aud": ["grafana", "meterflow"]});
        assert!(
            strict.check(&signed(listed)).is_some(),
            "aud as a list naming us"
        );
        // Without an audience configured, aud is not looked at.
        assert!(plain.check(&theirs).is_some() && plain.check(&none).is_some());
        // Not before: a clock 10 s behind the issuer's is within the leeway, a minute is not.
        let nbf = |ahead: u64| {
            signed(
                serde_json::json!({"sub": "s", "tenant": "acme", "scope": "metrics",
                "exp": now_s() + 600, "nbf": now_s() + ahead}),
            )
        };
        assert!(plain.check(&nbf(10)).is_some());
        assert_eq!(plain.check(&nbf(LEEWAY_S + 30)), None);
        // A token with no exp at all is refused.
        let forever = signed(serde_json::json!({"sub": "s", "tenant": "acme", "scope": "metrics"}));
        assert_eq!(plain.check(&forever), None);
    }

    #[test]
    fn scopes_decide_which_tenants_a_token_reaches() {
        let p = "akash1provider000000000000000000000000000000";
        let t = claims("acme", "metrics", 0);
        assert!(t.reaches("acme", p));
        assert!(!t.reaches("globex", p));
        assert!(!claims("acme", "other", 0).reaches("acme", p));
        assert!(!claims("", "metrics", 0).reaches("", p));
        assert!(claims("", "operator", 0).reaches("globex", p));
        assert!(claims("", "metrics operator", 0).has_scope("operator"));
        assert_eq!(t.reaches_lease("acme", "web-1", p), Grant::Lease);
        assert_eq!(t.reaches_lease("globex", "web-1", p), Grant::Nothing);
    }

    const OWNER: &str = "akash1owner000000000000000000000000000000000";
    const PROVIDER: &str = "akash1provider000000000000000000000000000000";

    /// A lease owner's claims as AEP-64 has them, with `leases` as given.
    fn owners(leases: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"iss": OWNER, "iat": now_s(), "exp": now_s() + 900,
            "version": "v1", "leases": leases})
    }

    #[test]
    fn a_lease_owners_token_reaches_the_owners_leases_as_its_leases_claim_says() {
        let auth = Auth::new(vec![Auth::hs256(SECRET)]);
        let full = auth
            .check(&signed(owners(serde_json::json!({"access": "full"}))))
            .expect("a lease owner's token with full access");
        assert_eq!(full.own_tenant(), OWNER);
        assert!(full.reaches(OWNER, PROVIDER) && full.reads_metrics(PROVIDER));
        assert!(!full.reaches("akash1someoneelse000000000000000000000000000", PROVIDER));
        assert_eq!(
            full.reaches_lease(OWNER, "1000.1.1", PROVIDER),
            Grant::Lease
        );
        // Granular: one deployment's web service at this provider.
        let web = auth
            .check(&signed(owners(serde_json::json!({"access": "granular",
                "permissions": [{"provider": PROVIDER, "access": "granular",
                    "deployments": [{"dseq": 1000, "scope": ["metrics"], "services": ["web"]}]}]}))))
            .expect("a granular token");
        assert!(web.reads_metrics(PROVIDER) && !web.reaches(OWNER, PROVIDER));
        assert_eq!(
            web.reaches_lease(OWNER, "1000.1.1", PROVIDER),
            Grant::Services(vec!["web".into()])
        );
        assert_eq!(
            web.reaches_lease(OWNER, "1001.1.1", PROVIDER),
            Grant::Nothing
        );
        // Logs only: valid, and reaches no metrics.
        let logs = auth
            .check(&signed(owners(
                serde_json::json!({"access": "scoped", "scope": ["logs"]}),
            )))
            .expect("a scoped token");
        assert!(!logs.reads_metrics(PROVIDER));
        // A ticket-style copy keeps what it reaches.
        let copy = Claims {
            exp: now_s() + 60,
            ..web.clone()
        };
        assert_eq!(
            copy.reaches_lease(OWNER, "1000.1.1", PROVIDER),
            web.reaches_lease(OWNER, "1000.1.1", PROVIDER)
        );
    }

    #[test]
    fn lease_owner_tokens_the_provider_would_refuse_are_refused() {
        let auth = Auth::new(vec![Auth::hs256(SECRET)]);
        let full = || owners(serde_json::json!({"access": "full"}));
        let with = |key: &str, value: serde_json::Value| {
            let mut claims = full();
            claims[key] = value;
            signed(claims)
        };
        let without = |key: &str| {
            let mut claims = full();
            claims.as_object_mut().expect("an object").remove(key);
            signed(claims)
        };
        assert!(
            auth.check(&signed(full())).is_some(),
            "the token itself is good"
        );
        for (token, why) in [
            (
                with("iss", "acme".into()),
                "an issuer that is not an Akash account",
            ),
            (without("iss"), "no issuer"),
            (without("iat"), "no issue time"),
            (with("version", "v2".into()), "another version"),
            (with("tenant", "acme".into()), "a tenant beside the leases"),
            (
                with("scope", "operator".into()),
                "a scope beside the leases",
            ),
            (
                with("leases", serde_json::json!({"access": "scoped"})),
                "a leases claim the provider refuses",
            ),
        ] {
            assert_eq!(auth.check(&token), None, "{why}");
        }
        // A Meterflow token needs its subject; one without a scope is valid and reaches nothing.
        let no_sub =
            serde_json::json!({"tenant": "acme", "scope": "metrics", "exp": now_s() + 600});
        assert_eq!(auth.check(&signed(no_sub)), None);
        let no_scope = serde_json::json!({"sub": "s", "tenant": "acme", "exp": now_s() + 600});
        let no_scope = auth.check(&signed(no_scope)).expect("valid");
        assert!(!no_scope.reaches("acme", PROVIDER) && !no_scope.reads_metrics(PROVIDER));
    }

    #[test]
    fn ed25519_tokens_are_checked_with_the_public_key_alone() {
        let private = include_bytes!("../../tests/fixtures/ed25519-private.pem");
        let public = include_bytes!("../../tests/fixtures/ed25519-public.pem");
        let key = Auth::public_key_pem(public, "fixture").expect("an Ed25519 public key");
        assert_eq!(key.algorithm, Algorithm::EdDSA);
        let auth = Auth::new(vec![key]);
        let c = claims("", "operator", now_s() + 600);
        let token = mint(&SigningKey::Pem(private.to_vec()), &c).expect("mints");
        assert_eq!(auth.check(&token), Some(c.clone()));
        // HS256 with the public key's bytes as the secret: the old algorithm confusion.
        let confused = mint(&SigningKey::Hs256(public.to_vec()), &c).expect("mints");
        assert_eq!(auth.check(&confused), None);
        assert!(Auth::public_key_pem(b"not a key", "x").is_err());
    }

    fn b64(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}
