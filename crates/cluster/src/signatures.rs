//! The node's check of signed writes: which collections require them (from the
//! configuration), the cluster's authority they must chain to, and the count of refusals.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use agentstore_core::config::Config;
use agentstore_core::signing::{SignatureRefused, Signatures};
use agentstore_core::{ConsistencyLevel, Key};
use agentstore_trust::{Attestation, PublicKey};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Most verified chains remembered.
const CHAINS: usize = 4096;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Refusal {
    level: &'static str,
    reason: &'static str,
}

/// The signed collections of a configuration, checked against the cluster's authority.
pub struct SignedCollections {
    authority: PublicKey,
    /// Token chains already found to come from the authority (a writer signs many writes
    /// with one chain): each write then costs one signature check, not one per block.
    /// Cleared when full.
    chains: Mutex<HashSet<Vec<u8>>>,
    /// Each signed collection and its level (a label of the refusal count).
    collections: BTreeMap<String, ConsistencyLevel>,
    refused: Family<Refusal, Counter>,
}

impl fmt::Debug for SignedCollections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedCollections")
            .field("authority", &self.authority.to_string())
            .field("collections", &self.collections)
            .finish_non_exhaustive()
    }
}

impl SignedCollections {
    /// The collections of `config` with `signed: true`, whose writers' tokens chain to
    /// `authority`; `None` when there are none.
    pub fn from_config(config: &Config, authority: PublicKey) -> Option<Self> {
        let collections: BTreeMap<String, ConsistencyLevel> = config
            .plans()
            .into_iter()
            .filter(|plan| plan.signed)
            .map(|plan| (plan.name, plan.consistency))
            .collect();
        (!collections.is_empty()).then(|| Self {
            authority,
            chains: Mutex::new(HashSet::new()),
            collections,
            refused: Family::default(),
        })
    }

    /// Registers the refusal count (`agentstore_signed_writes_refused_total`, by level and
    /// reason) in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "agentstore_signed_writes_refused",
            "Records and writes of signed collections this node refused to store: unsigned, an \
             invalid signature (forged, altered, not allowed by the writer's token), or stamped \
             outside the window of their signing time",
            self.refused.clone(),
        );
    }

    /// How many records and writes this node refused so far, over every level and reason.
    pub fn refused_total(&self) -> u64 {
        let mut total = 0;
        for level in [
            ConsistencyLevel::Eventual,
            ConsistencyLevel::Causal,
            ConsistencyLevel::Strong,
        ] {
            for reason in ["unsigned", "invalid", "outside_window"] {
                total += self
                    .refused
                    .get_or_create(&Refusal {
                        level: level.as_str(),
                        reason,
                    })
                    .get();
            }
        }
        total
    }
}

impl Signatures for SignedCollections {
    fn required(&self, key: &Key) -> bool {
        self.collections.contains_key(key.collection())
    }

    fn verify(
        &self,
        key: &Key,
        value: Option<&[u8]>,
        attestation: &[u8],
    ) -> Result<u64, SignatureRefused> {
        let invalid = |e: &dyn fmt::Display| SignatureRefused::Invalid(e.to_string());
        let key_text = key
            .as_str()
            .ok_or_else(|| invalid(&"a signed key must be UTF-8"))?;
        let attestation = Attestation::decode(attestation).map_err(|e| invalid(&e))?;
        let chain = attestation.chain_bytes();
        let known = lock(&self.chains).contains(&chain);
        if !known {
            attestation
                .verify_chain(&self.authority)
                .map_err(|e| invalid(&e))?;
            let mut chains = lock(&self.chains);
            if chains.len() >= CHAINS {
                chains.clear();
            }
            chains.insert(chain);
        }
        attestation
            .verify_write(key_text, value)
            .map_err(|e| invalid(&e))?;
        Ok(attestation.signed_at_ms())
    }

    fn refused(&self, key: &Key, why: &SignatureRefused) {
        let level = self
            .collections
            .get(key.collection())
            .map_or("eventual", |level| level.as_str());
        self.refused
            .get_or_create(&Refusal {
                level,
                reason: why.reason(),
            })
            .inc();
        tracing::warn!(key = %key, %why, "refused a write of a signed collection");
    }
}
