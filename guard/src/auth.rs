//! Bearer tokens (SPEC: HTTP API, auth): JWTs signed with HS256 (a shared secret) or with an
//! asymmetric key (EdDSA with Ed25519, or RS256), claims `sub`, `tenant`, `scope`
//! (space-separated: `metrics` for a tenant's data, `operator` for the fleet and every
//! tenant) and `exp`.
//!
//! Checked: the signature against every configured key of the token's algorithm, `exp` and
//! `nbf` when present (with a leeway for clock skew), `aud` when the sink is given an audience
//! (`--jwt-audience`: tokens of an identity provider that serves several services), and that
//! the algorithm is one configured — `alg: none` and an HS256 token made with a public key as
//! its secret are refused.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY_S: u64 = 30;

/// The claims of a Meterflow token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who the token was given to (a person, a service).
    pub sub: String,
    /// The tenant whose data a `metrics` token reaches; empty for an operator token.
    #[serde(default)]
    pub tenant: String,
    /// Space-separated scopes: `metrics`, `operator`.
    pub scope: String,
    /// Expiry, in seconds since the epoch.
    pub exp: u64,
}

impl Claims {
    /// Whether the token carries `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scope.split_whitespace().any(|s| s == scope)
    }

    /// Whether the token reaches `tenant`'s data: an operator reaches every tenant; a tenant
    /// token with the `metrics` scope reaches its own.
    pub fn reaches(&self, tenant: &str) -> bool {
        self.has_scope("operator")
            || (self.has_scope("metrics") && !self.tenant.is_empty() && self.tenant == tenant)
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
}

/// How the sink checks tokens.
#[derive(Clone, Default)]
pub struct Auth {
    keys: Vec<VerifyingKey>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algorithms: Vec<_> = self.keys.iter().map(|k| k.algorithm).collect();
        f.debug_struct("Auth").field("keys", &algorithms).finish()
    }
}

/// The shortest HS256 secret accepted (RFC 7518: at least the hash's size).
pub const MIN_SECRET_BYTES: usize = 32;

impl Auth {
    /// Tokens signed with any of `keys` are accepted. With no keys, every request that needs a
    /// token is refused (use [`Auth::hs256`] or a public key).
    pub fn new(keys: Vec<VerifyingKey>) -> Self {
        Self { keys }
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
        let header = jsonwebtoken::decode_header(token).ok()?;
        self.keys
            .iter()
            .filter(|k| k.algorithm == header.alg)
            .find_map(|k| {
                jsonwebtoken::decode::<Claims>(token, &k.key, &k.validation)
                    .ok()
                    .map(|data| data.claims)
            })
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
        let t = claims("acme", "metrics", 0);
        assert!(t.reaches("acme"));
        assert!(!t.reaches("globex"));
        assert!(!claims("acme", "other", 0).reaches("acme"));
        assert!(!claims("", "metrics", 0).reaches(""));
        assert!(claims("", "operator", 0).reaches("globex"));
        assert!(claims("", "metrics operator", 0).has_scope("operator"));
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
