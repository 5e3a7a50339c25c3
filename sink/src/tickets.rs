//! Feed tickets: how a browser opens a feed. `EventSource` cannot send an `Authorization`
//! header, so a page asks `GET /v1/feeds/ticket` with its bearer token and opens the feed with
//! `?ticket=…`. A ticket is a token this sink signs with a key it draws at start (never
//! written anywhere), carrying the bearer's claims (its tenant and scopes, or a lease owner's
//! leases) for [`TICKET_TTL_S`] seconds: it opens feeds only (no other route takes it; the
//! sink's token keys do not check it), it is checked when the feed connects, and the sink never
//! logs a request's URL. A ticket that leaks from a proxy's log is of use for a minute, to read
//! a feed the bearer could read.

use meterflow_guard::auth::{Auth, Claims, SigningKey, mint};

/// How long a ticket opens feeds, in seconds (the token check allows 30 s more for clock skew).
pub const TICKET_TTL_S: u64 = 60;

/// The key tickets are signed and checked with.
#[derive(Clone)]
pub struct Tickets {
    secret: Vec<u8>,
    auth: Auth,
}

impl Tickets {
    /// A key of 32 random bytes from the operating system.
    pub fn new() -> std::io::Result<Self> {
        use std::io::Read;
        let mut secret = vec![0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut secret)?;
        Ok(Self::with_secret(secret))
    }

    fn with_secret(secret: Vec<u8>) -> Self {
        Self {
            auth: Auth::new(vec![Auth::hs256(&secret)]),
            secret,
        }
    }

    /// A ticket for what `claims` reach, valid from `now_s` for [`TICKET_TTL_S`].
    pub fn mint(&self, claims: &Claims, now_s: u64) -> Option<String> {
        let ticket = Claims {
            exp: now_s + TICKET_TTL_S,
            ..claims.clone()
        };
        mint(&SigningKey::Hs256(self.secret.clone()), &ticket).ok()
    }

    /// The claims of a ticket this sink signed and that has not expired.
    pub fn check(&self, ticket: &str) -> Option<Claims> {
        self.auth.check(ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterflow_guard::auth::now_s;

    #[test]
    fn a_ticket_carries_the_bearers_reach_for_a_minute_and_only_its_sinks_key_checks_it() {
        let tickets = Tickets::with_secret(b"a feed ticket key of 32 bytes.....".to_vec());
        let bearer = Claims {
            sub: "alice".into(),
            tenant: "acme".into(),
            scope: "metrics".into(),
            exp: now_s() + 86_400,
            ..Claims::default()
        };
        let ticket = tickets.mint(&bearer, now_s()).expect("minted");
        let claims = tickets.check(&ticket).expect("valid");
        assert_eq!(
            (claims.tenant.as_str(), claims.scope.as_str()),
            ("acme", "metrics")
        );
        assert!(
            claims.exp <= now_s() + TICKET_TTL_S,
            "a minute, not the bearer's day"
        );
        // Minted two minutes ago: expired (past the 30 s of leeway).
        let old = tickets.mint(&bearer, now_s() - 120).expect("minted");
        assert!(tickets.check(&old).is_none());
        // Another sink (another key) does not take it.
        let other = Tickets::with_secret(b"another sink's key, also 32 bytes".to_vec());
        assert!(other.check(&ticket).is_none());
    }
}
