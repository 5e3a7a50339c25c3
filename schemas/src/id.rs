//! Stable content ids.
//!
//! Output records carry ids derived from what they are about (key, window), so that a record
//! re-emitted after a crash has the same id as the first emission and consumers can drop the
//! duplicate. Two hashes, both written out or pinned so that they never change with a compiler
//! or library version (unlike `std`'s `DefaultHasher`):
//! - [`StableId`], FNV-1a (64 bit): fast, but not collision-resistant; for ids whose collision
//!   harms nobody but the one who chose the names (a tenant's own usage records, which every
//!   store keys under the tenant's name), and for partition keys.
//! - [`StrongId`], SHA-256: for ids that tenants' names must never be able to make collide with
//!   another tenant's (billing record ids, which billing systems deduplicate by across all
//!   tenants; the processor's interned names). Finding names that hit a given id takes about
//!   2^128 tries for its 128-bit form, 2^64 for its 64-bit form.

/// The field methods both ids share, over their own `bytes`.
macro_rules! fields {
    () => {
        /// Adds a string field (length-prefixed, so `("ab","c")` and `("a","bc")` differ).
        pub fn str(self, s: &str) -> Self {
            self.bytes(&(s.len() as u64).to_le_bytes())
                .bytes(s.as_bytes())
        }

        /// Adds an integer field.
        pub fn int(self, v: i64) -> Self {
            self.bytes(&v.to_le_bytes())
        }
    };
}

const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// Builds a stable 64-bit id from a sequence of fields.
#[derive(Debug, Clone)]
pub struct StableId(u64);

impl Default for StableId {
    fn default() -> Self {
        Self(OFFSET)
    }
}

impl StableId {
    /// Starts an id; `domain` keeps ids of different record kinds apart.
    pub fn new(domain: &str) -> Self {
        Self::default().str(domain)
    }

    fields!();

    fn bytes(mut self, bytes: &[u8]) -> Self {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(PRIME);
        }
        self
    }

    /// The id as a number.
    pub fn value(&self) -> u64 {
        self.0
    }

    /// The id as 16 lowercase hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Builds an id from a sequence of fields with SHA-256 (fields length-prefixed, like
/// [`StableId`]'s).
#[derive(Debug, Clone)]
pub struct StrongId(sha2::Sha256);

impl StrongId {
    /// Starts an id; `domain` keeps ids of different record kinds apart.
    pub fn new(domain: &str) -> Self {
        use sha2::Digest;
        Self(sha2::Sha256::new()).str(domain)
    }

    fields!();

    fn bytes(mut self, bytes: &[u8]) -> Self {
        use sha2::Digest;
        self.0.update(bytes);
        self
    }

    fn digest(&self) -> [u8; 32] {
        use sha2::Digest;
        self.0.clone().finalize().into()
    }

    /// The first 64 bits of the digest, as a number.
    pub fn value(&self) -> u64 {
        let d = self.digest();
        u64::from_be_bytes(d[..8].try_into().expect("a digest has 32 bytes"))
    }

    /// The first 128 bits of the digest, as 32 lowercase hex digits.
    pub fn hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        // One allocation: every usage record's key is one of these.
        let mut hex = String::with_capacity(32);
        for b in &self.digest()[..16] {
            hex.push(DIGITS[usize::from(b >> 4)] as char);
            hex.push(DIGITS[usize::from(b & 0xf)] as char);
        }
        hex
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_test_vector() {
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c (Fowler/Noll/Vo reference vectors).
        assert_eq!(StableId::default().bytes(b"a").hex(), "af63dc4c8601ec8c");
    }

    #[test]
    fn field_boundaries_matter() {
        let a = StableId::new("u").str("ab").str("c").hex();
        let b = StableId::new("u").str("a").str("bc").hex();
        assert_ne!(a, b);
        assert_eq!(a, StableId::new("u").str("ab").str("c").hex());
    }

    #[test]
    fn strong_ids_are_sha256_of_the_length_prefixed_fields() {
        // SHA-256 of the empty string (FIPS 180-2 test vectors): e3b0c442 98fc1c14 9afbf4c8
        // 996fb924 …; a domain-less id of no fields is exactly that.
        use sha2::Digest;
        let empty = StrongId(sha2::Sha256::new());
        assert_eq!(empty.hex(), "e3b0c44298fc1c149afbf4c8996fb924");
        assert_eq!(empty.value(), 0xe3b0_c442_98fc_1c14);
        let a = StrongId::new("u").str("ab").str("c");
        assert_ne!(a.hex(), StrongId::new("u").str("a").str("bc").hex());
        assert_ne!(a.hex(), StrongId::new("v").str("ab").str("c").hex());
        assert_eq!(a.hex(), StrongId::new("u").str("ab").str("c").hex());
        assert_eq!(a.hex().len(), 32);
    }
}
