//! The `leases` claim of an Akash lease owner's token (AEP-64, as the Akash provider checks
//! it): which of the owner's leases a token reaches, at which provider, for which scopes.
//!
//! ```json
//! {"iss": "akash1…", "iat": 1733500000, "exp": 1733500900, "version": "v1",
//!  "leases": {"access": "granular", "permissions": [
//!    {"provider": "akash1…", "access": "granular",
//!     "deployments": [{"dseq": 1000, "gseq": 1, "scope": ["metrics"], "services": ["web"]}]}]}}
//! ```
//!
//! - `access: full`: every lease of the issuer, every scope.
//! - `access: scoped`: every lease of the issuer, for the scopes listed.
//! - `access: granular`: per provider, `full`, `scoped` or `granular` again, the last per
//!   deployment (`dseq`; `gseq` and `oseq` narrow it when not 0), for the scopes listed, and
//!   for the services listed.
//!
//! The shape and the checks are the provider's (`akash-api`'s `util/jwt`): a version `v1`, an
//! issuer that is an Akash account, an issue time, no `permissions` beside `full` or `scoped`
//! access, a scope for `scoped` access, a provider once, a `dseq` for each deployment and a
//! `gseq` under any `oseq`. What a token reaches of Meterflow's data is the `metrics` scope (the
//! scope AEP-43 reads lease metrics with); other scopes (`logs`, `shell`, …) reach nothing here.

use serde::{Deserialize, Serialize};

/// The scope that reads a lease's metrics.
pub const METRICS: &str = "metrics";

/// How much a token, or one provider's permission in it, reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Full,
    Scoped,
    Granular,
    None,
}

/// The `leases` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leases {
    pub access: Access,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scope: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<Permission>,
}

/// What a token reaches at one provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permission {
    pub provider: String,
    pub access: Access,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scope: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deployments: Vec<Deployment>,
}

/// What a token reaches of one deployment (or one group or lease of it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub scope: Vec<String>,
    #[serde(default)]
    pub dseq: u64,
    /// 0: every group.
    #[serde(default)]
    pub gseq: u32,
    /// 0: every order.
    #[serde(default)]
    pub oseq: u32,
    /// Empty: every service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
}

/// A lease as Akash numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseId {
    pub dseq: u64,
    pub gseq: u32,
    pub oseq: u32,
}

impl LeaseId {
    /// `DSEQ.GSEQ.OSEQ`, the lease id the Akash preset gives a lease; `None` for any other.
    pub fn parse(lease: &str) -> Option<Self> {
        let mut parts = lease.split('.');
        let id = Self {
            dseq: parts.next()?.parse().ok()?,
            gseq: parts.next()?.parse().ok()?,
            oseq: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(id)
    }
}

/// What a token reaches of one lease's metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    Nothing,
    /// Every service.
    Lease,
    /// These services only.
    Services(Vec<String>),
}

fn has_metrics(scope: &[String]) -> bool {
    scope.iter().any(|s| s == METRICS)
}

/// Whether `iss` is an Akash account address (`akash1` and 38 more of bech32's letters).
pub fn is_account(iss: &str) -> bool {
    iss.len() == 44
        && iss.starts_with("akash1")
        && iss[6..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl Leases {
    /// The provider's checks of the claim's shape; the reason when it fails.
    pub fn validate(&self) -> Result<(), String> {
        match self.access {
            Access::Full | Access::Scoped if !self.permissions.is_empty() => {
                Err(format!("{:?} access cannot have permissions", self.access))
            }
            Access::Full if !self.scope.is_empty() => Err("full access cannot have a scope".into()),
            Access::Scoped if self.scope.is_empty() => Err("scoped access needs a scope".into()),
            Access::Granular if self.permissions.is_empty() => {
                Err("granular access needs permissions".into())
            }
            Access::Granular => {
                let mut providers: Vec<&str> = Vec::new();
                for p in &self.permissions {
                    if p.provider.is_empty() || providers.contains(&p.provider.as_str()) {
                        return Err(format!("provider {:?} empty or twice", p.provider));
                    }
                    providers.push(&p.provider);
                    p.validate()?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// What the claim reaches of `lease` of the issuer at `provider`.
    pub fn grant(&self, provider: &str, lease: Option<LeaseId>) -> Grant {
        match self.access {
            Access::Full => Grant::Lease,
            Access::Scoped if has_metrics(&self.scope) => Grant::Lease,
            Access::Granular => self
                .permissions
                .iter()
                .find(|p| p.provider == provider)
                .map_or(Grant::Nothing, |p| p.grant(lease)),
            _ => Grant::Nothing,
        }
    }

    /// Whether the claim reaches every lease of the issuer at `provider` (a tenant-wide
    /// answer: usage, costs, budgets).
    pub fn reaches_all(&self, provider: &str) -> bool {
        match self.access {
            Access::Full => true,
            Access::Scoped => has_metrics(&self.scope),
            Access::Granular => self.permissions.iter().any(|p| {
                p.provider == provider
                    && (p.access == Access::Full
                        || (p.access == Access::Scoped && has_metrics(&p.scope)))
            }),
            Access::None => false,
        }
    }

    /// Whether the claim reaches the metrics of any lease at `provider`.
    pub fn reaches_any(&self, provider: &str) -> bool {
        self.reaches_all(provider)
            || (self.access == Access::Granular
                && self.permissions.iter().any(|p| {
                    p.provider == provider
                        && p.access == Access::Granular
                        && p.deployments.iter().any(|d| has_metrics(&d.scope))
                }))
    }
}

impl Permission {
    fn validate(&self) -> Result<(), String> {
        let who = &self.provider;
        match self.access {
            Access::Full | Access::Scoped if !self.deployments.is_empty() => Err(format!(
                "{who}: {:?} access cannot have deployments",
                self.access
            )),
            Access::Full if !self.scope.is_empty() => {
                Err(format!("{who}: full access cannot have a scope"))
            }
            Access::Scoped if self.scope.is_empty() => {
                Err(format!("{who}: scoped access needs a scope"))
            }
            Access::Granular if !self.scope.is_empty() => Err(format!(
                "{who}: granular access has its scopes per deployment"
            )),
            Access::Granular if self.deployments.is_empty() => {
                Err(format!("{who}: granular access needs deployments"))
            }
            Access::Granular => self.deployments.iter().try_for_each(|d| {
                if d.scope.is_empty() {
                    Err(format!("{who}: a deployment needs a scope"))
                } else if d.dseq == 0 {
                    Err(format!("{who}: a deployment needs its dseq"))
                } else if d.oseq > 0 && d.gseq == 0 {
                    Err(format!("{who}: dseq {}: an oseq needs its gseq", d.dseq))
                } else {
                    Ok(())
                }
            }),
            _ => Ok(()),
        }
    }

    fn grant(&self, lease: Option<LeaseId>) -> Grant {
        match self.access {
            Access::Full => Grant::Lease,
            Access::Scoped if has_metrics(&self.scope) => Grant::Lease,
            Access::Granular => {
                let Some(lease) = lease else {
                    return Grant::Nothing;
                };
                let mut services: Vec<String> = Vec::new();
                for d in self.deployments.iter().filter(|d| {
                    d.dseq == lease.dseq
                        && (d.gseq == 0 || d.gseq == lease.gseq)
                        && (d.oseq == 0 || d.oseq == lease.oseq)
                        && has_metrics(&d.scope)
                }) {
                    if d.services.is_empty() {
                        return Grant::Lease;
                    }
                    services.extend(d.services.iter().cloned());
                }
                if services.is_empty() {
                    Grant::Nothing
                } else {
                    services.sort_unstable();
                    services.dedup();
                    Grant::Services(services)
                }
            }
            _ => Grant::Nothing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROVIDER: &str = "akash1provider000000000000000000000000000000";
    const OTHER: &str = "akash1other000000000000000000000000000000000";

    fn leases(json: serde_json::Value) -> Leases {
        serde_json::from_value(json).expect("a leases claim")
    }

    fn lease(dseq: u64, gseq: u32, oseq: u32) -> Option<LeaseId> {
        Some(LeaseId { dseq, gseq, oseq })
    }

    #[test]
    fn lease_ids_are_three_numbers() {
        assert_eq!(LeaseId::parse("1000.1.2"), lease(1000, 1, 2));
        for not in ["1000.1", "1000.1.2.3", "a.1.1", "", "1000..1", "-1.1.1"] {
            assert_eq!(LeaseId::parse(not), None, "{not:?}");
        }
        assert!(is_account(PROVIDER));
        assert!(!is_account("akash1short") && !is_account(&PROVIDER.to_uppercase()));
    }

    #[test]
    fn full_and_scoped_access_reach_every_lease_scoped_only_with_the_metrics_scope() {
        let full = leases(serde_json::json!({"access": "full"}));
        assert_eq!(full.validate(), Ok(()));
        assert_eq!(full.grant(PROVIDER, lease(1, 1, 1)), Grant::Lease);
        assert!(full.reaches_all(PROVIDER) && full.reaches_all(OTHER));
        let metrics = leases(serde_json::json!({"access": "scoped", "scope": ["logs", "metrics"]}));
        assert_eq!(metrics.grant(PROVIDER, None), Grant::Lease);
        assert!(metrics.reaches_all(PROVIDER));
        let logs = leases(serde_json::json!({"access": "scoped", "scope": ["logs", "shell"]}));
        assert_eq!(logs.grant(PROVIDER, lease(1, 1, 1)), Grant::Nothing);
        assert!(!logs.reaches_any(PROVIDER));
        let none = leases(serde_json::json!({"access": "none"}));
        assert_eq!(none.grant(PROVIDER, lease(1, 1, 1)), Grant::Nothing);
    }

    #[test]
    fn granular_access_reaches_its_provider_deployments_groups_orders_and_services() {
        let claim = leases(serde_json::json!({"access": "granular", "permissions": [
            {"provider": PROVIDER, "access": "granular", "deployments": [
                {"dseq": 1000, "scope": ["metrics"]},
                {"dseq": 2000, "gseq": 2, "scope": ["metrics"], "services": ["web"]},
                {"dseq": 2000, "gseq": 2, "oseq": 3, "scope": ["metrics"], "services": ["db", "web"]},
                {"dseq": 3000, "scope": ["logs"]}]},
            {"provider": OTHER, "access": "full"}]}));
        assert_eq!(claim.validate(), Ok(()));
        // Every group and order of deployment 1000.
        assert_eq!(claim.grant(PROVIDER, lease(1000, 4, 9)), Grant::Lease);
        // Group 2 of 2000: web only; its order 3 also db.
        assert_eq!(
            claim.grant(PROVIDER, lease(2000, 2, 1)),
            Grant::Services(vec!["web".into()])
        );
        assert_eq!(
            claim.grant(PROVIDER, lease(2000, 2, 3)),
            Grant::Services(vec!["db".into(), "web".into()])
        );
        assert_eq!(claim.grant(PROVIDER, lease(2000, 1, 1)), Grant::Nothing);
        // Logs are not metrics; a lease not listed; a lease id that is not Akash's.
        assert_eq!(claim.grant(PROVIDER, lease(3000, 1, 1)), Grant::Nothing);
        assert_eq!(claim.grant(PROVIDER, lease(4000, 1, 1)), Grant::Nothing);
        assert_eq!(claim.grant(PROVIDER, None), Grant::Nothing);
        // At this provider, some leases, not all; at the other, everything.
        assert!(claim.reaches_any(PROVIDER) && !claim.reaches_all(PROVIDER));
        assert!(claim.reaches_all(OTHER));
        // A provider the token does not name.
        let third = "akash1third000000000000000000000000000000000";
        assert_eq!(claim.grant(third, lease(1000, 1, 1)), Grant::Nothing);
        assert!(!claim.reaches_any(third));
    }

    #[test]
    fn claims_the_provider_refuses_are_refused() {
        for (bad, why) in [
            (
                serde_json::json!({"access": "full", "scope": ["metrics"]}),
                "full with a scope",
            ),
            (
                serde_json::json!({"access": "full", "permissions": [{"provider": PROVIDER, "access": "full"}]}),
                "full with permissions",
            ),
            (
                serde_json::json!({"access": "scoped"}),
                "scoped without a scope",
            ),
            (
                serde_json::json!({"access": "granular"}),
                "granular without permissions",
            ),
            (
                serde_json::json!({"access": "granular", "permissions": [
                    {"provider": PROVIDER, "access": "full"}, {"provider": PROVIDER, "access": "full"}]}),
                "a provider twice",
            ),
            (
                serde_json::json!({"access": "granular", "permissions": [
                    {"provider": PROVIDER, "access": "granular", "deployments": [{"scope": ["metrics"]}]}]}),
                "a deployment without its dseq",
            ),
            (
                serde_json::json!({"access": "granular", "permissions": [
                    {"provider": PROVIDER, "access": "granular", "deployments": [{"dseq": 1, "oseq": 1, "scope": ["metrics"]}]}]}),
                "an oseq without its gseq",
            ),
            (
                serde_json::json!({"access": "granular", "permissions": [
                    {"provider": PROVIDER, "access": "granular", "deployments": [{"dseq": 1, "scope": []}]}]}),
                "a deployment without a scope",
            ),
            (
                serde_json::json!({"access": "granular", "permissions": [
                    {"provider": PROVIDER, "access": "scoped", "scope": ["metrics"],
                     "deployments": [{"dseq": 1, "scope": ["metrics"]}]}]}),
                "scoped with deployments",
            ),
        ] {
            assert!(leases(bad).validate().is_err(), "{why}");
        }
        assert!(
            serde_json::from_value::<Leases>(serde_json::json!({"access": "everything"})).is_err(),
            "an access the provider does not know"
        );
    }
}
