//! Capability tokens: what a client may do, granted by the cluster's authority and narrowed
//! offline by whoever holds a token.
//!
//! A token is a chain of blocks. The first block is signed by the authority; every block names
//! a fresh key (`next`), and the following block is signed by that key's secret. The token
//! carries the last block's secret (the *proof*), so its holder, and only its holder, can add
//! a block: **attenuation** needs no authority and no network. A block can only narrow what
//! the blocks before it allow, since a request must be allowed by *every* block, and the
//! earliest expiry of any block applies. Removing a block leaves a proof that does not match
//! the last `next` key; altering one breaks its signature.
//!
//! Binary form, canonical:
//!
//! ```text
//! token = format (1 byte, 1) | block count (1 byte, 1..=16) | block* | proof seed (32)
//! block = right count (1 byte, 1..=32) | right* | expires_ms (8, big-endian; 0: never)
//!         | next key (32) | signature (64)
//! right = operations (1 byte: 1 read, 2 write, 4 admin) | prefix length (2, big-endian)
//!         | prefix (UTF-8, at most 512 bytes)
//! ```
//!
//! A block's signature covers `agentstore capability v1\0`, the previous block's signature
//! (none for the first), and the block's bytes before its signature, so a block cannot be
//! moved onto another token. Text form: `agentstore-token-v1:` and the binary form in
//! unpadded URL-safe base64 (what `Authorization: Bearer` carries).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair as _};

use crate::{PublicKey, SecretKey, TrustError};

const FORMAT: u8 = 1;
const DOMAIN: &[u8] = b"agentstore capability v1\0";
const TEXT_PREFIX: &str = "agentstore-token-v1:";
const MAX_BLOCKS: usize = 16;
const MAX_RIGHTS: usize = 32;
const MAX_PREFIX: usize = 512;

/// What a right lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operation {
    /// Read keys (get, scan, watch).
    Read,
    /// Write keys (put, delete, counters, sets, transactions, locks).
    Write,
    /// Change the cluster: Raft membership, leave, repair.
    Admin,
}

impl Operation {
    fn bit(self) -> u8 {
        match self {
            Self::Read => 1,
            Self::Write => 2,
            Self::Admin => 4,
        }
    }

    /// Its name, as the command line and errors spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Operations on the keys that start with a prefix (the empty prefix: every key, and the
/// cluster itself for `admin`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Right {
    operations: u8,
    prefix: String,
}

impl Right {
    /// `operations` on keys starting with `prefix`.
    pub fn new(operations: &[Operation], prefix: &str) -> Result<Self, TrustError> {
        if operations.is_empty() {
            return Err(TrustError::malformed("right", "no operation"));
        }
        if prefix.len() > MAX_PREFIX {
            return Err(TrustError::malformed(
                "right",
                format!("a prefix has at most {MAX_PREFIX} bytes"),
            ));
        }
        Ok(Self {
            operations: operations.iter().fold(0, |bits, op| bits | op.bit()),
            prefix: prefix.to_owned(),
        })
    }

    /// Whether this right covers `operation` on every key starting with `prefix` (a single
    /// key is its own prefix).
    fn covers(&self, operation: Operation, prefix: &str) -> bool {
        self.operations & operation.bit() != 0 && prefix.starts_with(&self.prefix)
    }
}

impl fmt::Display for Right {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ops: Vec<&str> = [Operation::Read, Operation::Write, Operation::Admin]
            .into_iter()
            .filter(|op| self.operations & op.bit() != 0)
            .map(Operation::as_str)
            .collect();
        write!(f, "{} on '{}'", ops.join("+"), self.prefix)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Block {
    rights: Vec<Right>,
    expires_ms: u64,
    next: PublicKey,
    signature: [u8; 64],
}

impl Block {
    /// A block granting `rights` until `expires_ms`, naming a fresh key (whose seed is
    /// returned), not signed yet.
    fn unsigned_with_fresh_key(
        rights: Vec<Right>,
        expires_ms: u64,
    ) -> Result<(Self, [u8; 32]), TrustError> {
        check_rights(&rights)?;
        let (seed, pair) = fresh_key();
        let block = Self {
            rights,
            expires_ms,
            next: public_of(&pair),
            signature: [0; 64],
        };
        Ok((block, seed))
    }

    fn unsigned(&self) -> Vec<u8> {
        let mut out = vec![self.rights.len() as u8];
        for right in &self.rights {
            out.push(right.operations);
            out.extend_from_slice(&(right.prefix.len() as u16).to_be_bytes());
            out.extend_from_slice(right.prefix.as_bytes());
        }
        out.extend_from_slice(&self.expires_ms.to_be_bytes());
        out.extend_from_slice(self.next.as_bytes());
        out
    }

    fn signed_message(&self, previous: Option<&[u8; 64]>) -> Vec<u8> {
        let mut message = DOMAIN.to_vec();
        if let Some(previous) = previous {
            message.extend_from_slice(previous);
        }
        message.extend_from_slice(&self.unsigned());
        message
    }

    fn allows(&self, operation: Operation, prefix: &str, now_ms: u64) -> bool {
        (self.expires_ms == 0 || now_ms < self.expires_ms)
            && self.rights.iter().any(|r| r.covers(operation, prefix))
    }
}

/// A capability token (see the module's doc).
#[derive(Clone, PartialEq, Eq)]
pub struct Capability {
    blocks: Vec<Block>,
    proof: [u8; 32],
}

impl fmt::Debug for Capability {
    /// The proof is a secret: never shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Capability")
            .field("blocks", &self.blocks.len())
            .field("rights", &self.rights())
            .finish_non_exhaustive()
    }
}

/// A fresh key pair and the seed it came from.
fn fresh_key() -> ([u8; 32], Ed25519KeyPair) {
    let mut seed = [0u8; 32];
    SystemRandom::new()
        .fill(&mut seed)
        .expect("the system random source works");
    let pair = Ed25519KeyPair::from_seed_unchecked(&seed).expect("any 32 bytes are a seed");
    (seed, pair)
}

fn public_of(pair: &Ed25519KeyPair) -> PublicKey {
    PublicKey::from_bytes(
        pair.public_key()
            .as_ref()
            .try_into()
            .expect("32-byte ed25519 keys"),
    )
}

impl Capability {
    /// The authority grants `rights` until `expires_ms` (milliseconds since the Unix epoch;
    /// 0: no expiry).
    pub fn issue(
        authority: &SecretKey,
        rights: Vec<Right>,
        expires_ms: u64,
    ) -> Result<Self, TrustError> {
        let (mut block, seed) = Block::unsigned_with_fresh_key(rights, expires_ms)?;
        block.signature = authority.sign(&block.signed_message(None));
        Ok(Self {
            blocks: vec![block],
            proof: seed,
        })
    }

    /// A narrower token: this one's rights further limited to `rights` (and, if earlier,
    /// `expires_ms`). Needs nothing but this token.
    pub fn attenuate(&self, rights: Vec<Right>, expires_ms: u64) -> Result<Self, TrustError> {
        if self.blocks.len() >= MAX_BLOCKS {
            return Err(TrustError::malformed(
                "token",
                format!("at most {MAX_BLOCKS} blocks"),
            ));
        }
        let holder = Ed25519KeyPair::from_seed_unchecked(&self.proof)
            .map_err(|e| TrustError::malformed("token", e.to_string()))?;
        let (mut block, seed) = Block::unsigned_with_fresh_key(rights, expires_ms)?;
        let previous = &self.blocks.last().expect("a token has a block").signature;
        let signature = holder.sign(&block.signed_message(Some(previous)));
        block.signature.copy_from_slice(signature.as_ref());
        let mut blocks = self.blocks.clone();
        blocks.push(block);
        Ok(Self {
            blocks,
            proof: seed,
        })
    }

    /// Checks the chain: the first block signed by `authority`, every later one by the key
    /// its predecessor named, and the proof the secret of the last named key.
    pub fn verify(&self, authority: &PublicKey) -> Result<(), TrustError> {
        let bad = |what: &'static str| TrustError::BadSignature {
            what,
            signer: format!("a chain from this cluster's authority ({authority})"),
        };
        let mut signer = *authority;
        let mut previous: Option<&[u8; 64]> = None;
        for block in &self.blocks {
            if !signer.verifies(&block.signed_message(previous), &block.signature) {
                return Err(bad("token"));
            }
            signer = block.next;
            previous = Some(&block.signature);
        }
        let proof = Ed25519KeyPair::from_seed_unchecked(&self.proof)
            .map_err(|e| TrustError::malformed("token", e.to_string()))?;
        if public_of(&proof) != signer {
            return Err(bad("token's proof"));
        }
        Ok(())
    }

    /// Whether the token (already verified) allows `operation` on every key starting with
    /// `prefix` at `now_ms`.
    pub fn allows(&self, operation: Operation, prefix: &str, now_ms: u64) -> bool {
        self.blocks
            .iter()
            .all(|block| block.allows(operation, prefix, now_ms))
    }

    /// When the token stops working (milliseconds since the Unix epoch), if ever.
    pub fn expires_ms(&self) -> Option<u64> {
        self.blocks
            .iter()
            .map(|b| b.expires_ms)
            .filter(|e| *e != 0)
            .min()
    }

    /// Each block's rights, first block first.
    pub fn rights(&self) -> Vec<Vec<String>> {
        self.blocks
            .iter()
            .map(|b| b.rights.iter().map(Right::to_string).collect())
            .collect()
    }

    /// The binary form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT, self.blocks.len() as u8];
        for block in &self.blocks {
            out.extend_from_slice(&block.unsigned());
            out.extend_from_slice(&block.signature);
        }
        out.extend_from_slice(&self.proof);
        out
    }

    /// Reads the binary form; refuses trailing bytes. Says nothing of the signatures: see
    /// [`Capability::verify`].
    pub fn decode(bytes: &[u8]) -> Result<Self, TrustError> {
        let mut reader = Reader(bytes);
        let format = reader.u8()?;
        if format != FORMAT {
            return Err(TrustError::malformed(
                "token",
                format!("unknown format {format}"),
            ));
        }
        let count = usize::from(reader.u8()?);
        if count == 0 || count > MAX_BLOCKS {
            return Err(TrustError::malformed("token", format!("{count} blocks")));
        }
        let mut blocks = Vec::with_capacity(count);
        for _ in 0..count {
            let rights_count = usize::from(reader.u8()?);
            let mut rights = Vec::with_capacity(rights_count.min(MAX_RIGHTS));
            for _ in 0..rights_count {
                let operations = reader.u8()?;
                let len = usize::from(u16::from_be_bytes(reader.array()?));
                let prefix = std::str::from_utf8(reader.take(len)?)
                    .map_err(|_| TrustError::malformed("token", "a prefix is not UTF-8"))?;
                if operations == 0 || operations & !7 != 0 || len > MAX_PREFIX {
                    return Err(TrustError::malformed("token", "a malformed right"));
                }
                rights.push(Right {
                    operations,
                    prefix: prefix.to_owned(),
                });
            }
            check_rights(&rights)?;
            blocks.push(Block {
                rights,
                expires_ms: u64::from_be_bytes(reader.array()?),
                next: PublicKey::from_bytes(reader.array()?),
                signature: reader.array()?,
            });
        }
        let proof = reader.array()?;
        if !reader.0.is_empty() {
            return Err(TrustError::malformed("token", "trailing bytes"));
        }
        Ok(Self { blocks, proof })
    }

    /// The text form.
    pub fn to_text(&self) -> String {
        format!("{TEXT_PREFIX}{}", URL_SAFE_NO_PAD.encode(self.encode()))
    }

    /// Reads the text form.
    pub fn from_text(text: &str) -> Result<Self, TrustError> {
        let encoded = text
            .trim()
            .strip_prefix(TEXT_PREFIX)
            .ok_or_else(|| TrustError::malformed("token", format!("expected `{TEXT_PREFIX}…`")))?;
        let bytes = URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|e| TrustError::malformed("token", e.to_string()))?;
        Self::decode(&bytes)
    }
}

fn check_rights(rights: &[Right]) -> Result<(), TrustError> {
    if rights.is_empty() || rights.len() > MAX_RIGHTS {
        return Err(TrustError::malformed(
            "token",
            format!(
                "a block grants 1 to {MAX_RIGHTS} rights, not {}",
                rights.len()
            ),
        ));
    }
    Ok(())
}

/// Reads a byte string front to back.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TrustError> {
        if self.0.len() < n {
            return Err(TrustError::malformed("token", "truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, TrustError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], TrustError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }
}
