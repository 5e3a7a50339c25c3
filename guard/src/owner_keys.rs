//! Lease owners' own signatures (AEP-64): an owner's client signs its token with the owner's
//! account key, `alg: ES256K` (ECDSA on secp256k1 over the SHA-256 of the token's signing
//! input, the signature `r‖s` with a low `s`, as the Cosmos SDK signs), and the provider checks
//! it against the account's public key, which the chain holds.
//!
//! The sink reads those public keys from a file (`--lease-owner-keys`), one per line, as
//! `akash query auth account` or `akash keys show -p` prints them: the 33-byte compressed key
//! in base64, bare or as `{"@type":"/cosmos.crypto.secp256k1.PubKey","key":"…"}`; `#` starts
//! a comment. Each key's account is derived from the key (bech32 `akash` of the RIPEMD-160 of
//! its SHA-256), so a line cannot name an account the key is not; a line may still name the
//! account first (`akash1… KEY`), which is then checked against the key. The file is read again
//! when it changes (looked at once every [`RELOAD_S`] seconds at most), so a provider adds a
//! new owner's key without a restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use k256::ecdsa::signature::Verifier;
use k256::ecdsa::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::auth::{AuthError, Claims, LEEWAY_S, now_s};

/// How often, at most, the key file is looked at for a change, in seconds.
pub const RELOAD_S: u64 = 10;

/// The account (`hrp1…`) of a compressed secp256k1 public key, as the Cosmos SDK derives it.
pub fn account(hrp: &str, key: &[u8]) -> String {
    let hash = ripemd::Ripemd160::digest(Sha256::digest(key));
    let hrp = bech32::Hrp::parse(hrp).expect("a valid human-readable part");
    bech32::encode::<bech32::Bech32>(hrp, &hash).expect("20 bytes fit in bech32")
}

/// The keys of a key file by account; the first bad line's number and why.
pub fn parse(text: &str) -> Result<HashMap<String, VerifyingKey>, String> {
    let mut keys = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let bad = |why: &str| format!("line {}: {why}", n + 1);
        let (named, key) = match line.split_once(char::is_whitespace) {
            Some((named, key)) if named.starts_with("akash1") => (Some(named), key.trim()),
            _ => (None, line),
        };
        let key = match key.strip_prefix('{') {
            Some(_) => serde_json::from_str::<serde_json::Value>(key)
                .ok()
                .and_then(|v| v["key"].as_str().map(str::to_string))
                .ok_or_else(|| bad("a JSON public key without a \"key\""))?,
            None => key.to_string(),
        };
        let bytes = STANDARD
            .decode(&key)
            .map_err(|_| bad("not base64 (the 33-byte compressed key, as the chain shows it)"))?;
        if bytes.len() != 33 {
            return Err(bad(&format!(
                "{} bytes; a compressed secp256k1 key has 33",
                bytes.len()
            )));
        }
        let verifying =
            VerifyingKey::from_sec1_bytes(&bytes).map_err(|_| bad("not a point of secp256k1"))?;
        let derived = account("akash", &bytes);
        if let Some(named) = named.filter(|named| *named != derived) {
            return Err(bad(&format!("the key is {derived}'s, not {named}'s")));
        }
        keys.insert(derived, verifying);
    }
    Ok(keys)
}

struct Loaded {
    checked: Instant,
    modified: Option<SystemTime>,
    keys: HashMap<String, VerifyingKey>,
}

/// The lease owners' public keys the sink checks `ES256K` tokens with.
pub struct OwnerKeys {
    path: PathBuf,
    /// How often, at most, the file is looked at for a change.
    reload: Duration,
    loaded: Mutex<Loaded>,
}

impl std::fmt::Debug for OwnerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnerKeys")
            .field("path", &self.path)
            .finish()
    }
}

fn read(path: &Path) -> Result<(Option<SystemTime>, HashMap<String, VerifyingKey>), AuthError> {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let keys = parse(&text).map_err(|why| AuthError::OwnerKeys {
        path: path.display().to_string(),
        why,
    })?;
    Ok((modified, keys))
}

impl OwnerKeys {
    /// Reads the key file; an unreadable file or a bad line is an error (at start, the sink
    /// refuses to run with it).
    pub fn open(path: &Path) -> Result<Self, AuthError> {
        Self::open_reloading(path, Duration::from_secs(RELOAD_S))
    }

    /// [`OwnerKeys::open`], the file looked at for a change every `reload` at most.
    pub fn open_reloading(path: &Path, reload: Duration) -> Result<Self, AuthError> {
        let (modified, keys) = read(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            reload,
            loaded: Mutex::new(Loaded {
                checked: Instant::now(),
                modified,
                keys,
            }),
        })
    }

    /// Keys given directly (tests).
    pub fn from_keys(keys: HashMap<String, VerifyingKey>) -> Self {
        Self {
            path: PathBuf::new(),
            reload: Duration::MAX,
            loaded: Mutex::new(Loaded {
                checked: Instant::now(),
                modified: None,
                keys,
            }),
        }
    }

    /// How many owners' keys are held.
    pub fn len(&self) -> usize {
        self.loaded.lock().map(|l| l.keys.len()).unwrap_or(0)
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `account`'s key, the file read again first if it changed. A file that became bad keeps
    /// the keys read before (and says so in the log).
    fn key(&self, account: &str) -> Option<VerifyingKey> {
        let mut loaded = self.loaded.lock().ok()?;
        if !self.path.as_os_str().is_empty() && loaded.checked.elapsed() >= self.reload {
            loaded.checked = Instant::now();
            let modified = std::fs::metadata(&self.path)
                .and_then(|m| m.modified())
                .ok();
            if modified != loaded.modified {
                match read(&self.path) {
                    Ok((modified, keys)) => {
                        loaded.modified = modified;
                        loaded.keys = keys;
                    }
                    Err(e) => {
                        loaded.modified = modified;
                        tracing::warn!(error = %e, "lease owners' keys not read again; the ones read before stay");
                    }
                }
            }
        }
        loaded.keys.get(account).cloned()
    }

    /// The claims of an `ES256K` token signed by the key of its issuer, unexpired (with the
    /// leeway), and a lease owner's (the claims' own checks follow in [`crate::auth::Auth`]);
    /// `None` otherwise.
    pub fn check(&self, token: &str) -> Option<Claims> {
        let mut parts = token.split('.');
        let (header, payload, signature) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).ok()?).ok()?;
        if header["alg"] != "ES256K" {
            return None;
        }
        let body: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
        let not_before = body.get("nbf").map(serde_json::Value::as_u64);
        let claims: Claims = serde_json::from_value(body).ok()?;
        let key = self.key(claims.lease_owner()?.0)?;
        let signature = Signature::from_slice(&URL_SAFE_NO_PAD.decode(signature).ok()?).ok()?;
        if signature.normalize_s().is_some() {
            // A high `s`: the Cosmos SDK refuses it (the same signature, malleated).
            return None;
        }
        // What the signature covers: `header.payload`.
        let input = &token[..token.rfind('.')?];
        key.verify(input.as_bytes(), &signature).ok()?;
        let now = now_s();
        let early = match not_before {
            None => false,
            Some(Some(nbf)) => nbf > now.saturating_add(LEEWAY_S),
            Some(None) => true,
        };
        if early || claims.exp.saturating_add(LEEWAY_S) < now {
            return None;
        }
        Some(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k256::ecdsa::SigningKey;
    use k256::ecdsa::signature::Signer;

    #[test]
    fn accounts_are_derived_as_cosmos_chains_derive_them() {
        // Keys and addresses as `keys add` printed them on three Cosmos chains (each its own
        // prefix, the same derivation).
        for (address, key) in [
            (
                "ununifi1u6x6q5c7vxw0uss0ep9clq2ppd8v5cfvcnqkuz",
                "AuzqeSzCKLa6nljPKb+CuLS53lJIxHoniRFoEoGxz2Uj",
            ),
            (
                "bitsong1a695qts2n3hx0gnqwysau2mf9nj6y6524wmz33",
                "A7s8GHBMD6FAIbTKu4JiimHpey6++/zY7lPa9Th41TWt",
            ),
            (
                "cudos1qr5rt72yf7s340azajpxay6hw3z5ldne7dd5n3",
                "AmeChzeLCPCtPKrIVs7hp737DBNU7XlYVwDZfhJ3SdXq",
            ),
        ] {
            let hrp = address.split('1').next().expect("a prefix");
            let bytes = STANDARD.decode(key).expect("base64");
            assert_eq!(account(hrp, &bytes), address);
        }
    }

    #[test]
    fn a_key_file_takes_bare_and_json_keys_and_refuses_what_it_cannot_check() {
        let key = "AuzqeSzCKLa6nljPKb+CuLS53lJIxHoniRFoEoGxz2Uj";
        let bytes = STANDARD.decode(key).expect("base64");
        let owner = account("akash", &bytes);
        let text = format!(
            "# owners\n{key}\n\n{owner} {{\"@type\":\"/cosmos.crypto.secp256k1.PubKey\",\"key\":\"A7s8GHBMD6FAIbTKu4JiimHpey6++/zY7lPa9Th41TWt\"}}\n"
        );
        let err = parse(&text).expect_err("the second key is not the named account's");
        assert!(err.starts_with("line 4: the key is akash1"), "{err}");
        let keys = parse(&format!(
            "{key} # one\n{{\"@type\":\"/cosmos.crypto.secp256k1.PubKey\",\"key\":\"A7s8GHBMD6FAIbTKu4JiimHpey6++/zY7lPa9Th41TWt\"}}\n{owner} {key}"
        ))
        .expect("good lines");
        assert_eq!(keys.len(), 2);
        assert!(keys.contains_key(&owner));
        for (bad, why) in [
            ("not base64!", "not base64"),
            ("AAAA", "3 bytes"),
            (
                // 33 bytes, no point of the curve (x = 0 has none with prefix 02... try 05).
                "BQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                "not a point",
            ),
        ] {
            let err = parse(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// A token as an owner's client makes it: ES256K over `header.payload`.
    fn sign(key: &SigningKey, claims: &serde_json::Value) -> String {
        let input = format!(
            "{}.{}",
            b64(br#"{"alg":"ES256K","typ":"JWT"}"#),
            b64(claims.to_string().as_bytes())
        );
        let signature: Signature = key.sign(input.as_bytes());
        format!("{input}.{}", b64(&signature.to_bytes()))
    }

    #[test]
    fn a_key_added_to_the_file_is_taken_and_a_file_gone_bad_keeps_the_keys_before() {
        let dir = std::env::temp_dir().join(format!("owner-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("owners.keys");
        let first = SigningKey::from_slice(&[3u8; 32]).expect("a key");
        let second = SigningKey::from_slice(&[4u8; 32]).expect("a key");
        let line = |k: &SigningKey| {
            STANDARD.encode(k.verifying_key().to_encoded_point(true).as_bytes()) + "\n"
        };
        let account_of =
            |k: &SigningKey| account("akash", k.verifying_key().to_encoded_point(true).as_bytes());
        // Each write gets a later modification time, whatever the file system's resolution.
        let write = |text: String, second_of: u64| {
            std::fs::write(&path, text).expect("written");
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + second_of);
            std::fs::File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(at))
                .expect("mtime set");
        };
        write(line(&first), 0);
        let keys = OwnerKeys::open_reloading(&path, Duration::ZERO).expect("reads");
        assert!(keys.key(&account_of(&first)).is_some());
        assert!(keys.key(&account_of(&second)).is_none());
        write(line(&first) + &line(&second), 1);
        assert!(
            keys.key(&account_of(&second)).is_some(),
            "the added key is taken"
        );
        write("not a key\n".into(), 2);
        assert!(
            keys.key(&account_of(&first)).is_some() && keys.key(&account_of(&second)).is_some(),
            "a bad file keeps the keys read before"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn an_owners_token_is_accepted_signed_with_its_issuers_key_only() {
        let owner_key = SigningKey::from_slice(&[7u8; 32]).expect("a key");
        let other_key = SigningKey::from_slice(&[9u8; 32]).expect("a key");
        let public = owner_key.verifying_key().to_encoded_point(true);
        let owner = account("akash", public.as_bytes());
        let keys =
            OwnerKeys::from_keys(HashMap::from([(owner.clone(), *owner_key.verifying_key())]));
        let claims = |iss: &str, exp: u64| {
            serde_json::json!({"iss": iss, "iat": now_s(), "exp": exp, "version": "v1",
                "leases": {"access": "full"}})
        };
        let good = sign(&owner_key, &claims(&owner, now_s() + 900));
        let got = keys.check(&good).expect("the owner's own token");
        assert_eq!(got.iss.as_deref(), Some(owner.as_str()));
        // Another key's signature over the owner's claims; an unknown issuer; expired.
        assert!(
            keys.check(&sign(&other_key, &claims(&owner, now_s() + 900)))
                .is_none()
        );
        let stranger = account(
            "akash",
            other_key.verifying_key().to_encoded_point(true).as_bytes(),
        );
        assert!(
            keys.check(&sign(&other_key, &claims(&stranger, now_s() + 900)))
                .is_none()
        );
        assert!(
            keys.check(&sign(&owner_key, &claims(&owner, now_s() - LEEWAY_S - 5)))
                .is_none()
        );
        // The claims changed after signing.
        let mut parts: Vec<&str> = good.split('.').collect();
        let forged = b64(claims(&owner, now_s() + 86_400).to_string().as_bytes());
        parts[1] = &forged;
        assert!(keys.check(&parts.join(".")).is_none());
        // The same signature with s replaced by n − s (valid ECDSA, refused as Cosmos does).
        let signature = Signature::from_slice(
            &URL_SAFE_NO_PAD
                .decode(good.rsplit('.').next().expect("a signature"))
                .expect("base64"),
        )
        .expect("a signature");
        let (r, s) = signature.split_scalars();
        let high = Signature::from_scalars(r, -*s).expect("a signature");
        let input = &good[..good.rfind('.').expect("three parts")];
        assert!(
            keys.check(&format!("{input}.{}", b64(&high.to_bytes())))
                .is_none()
        );
        // Not ES256K at all.
        assert!(keys.check("e30.e30.").is_none());
    }
}
