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
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair as _};

use crate::attestation::Attestation;
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

/// The blocks of a token without its proof: what a token grants, and the key its holder
/// signs with. A capability carries one with its proof; a signed write carries one with the
/// proof's signature instead (`Attestation`), so replicas can check what the writer may do
/// without ever holding its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chain {
    blocks: Vec<Block>,
}

impl Chain {
    /// Checks every block's signature, the first by `authority`; returns the key the last
    /// block names (the holder's).
    pub(crate) fn verify(
        &self,
        authority: &PublicKey,
        what: &'static str,
    ) -> Result<PublicKey, TrustError> {
        let mut signer = *authority;
        let mut previous: Option<&[u8; 64]> = None;
        for block in &self.blocks {
            if !signer.verifies(&block.signed_message(previous), &block.signature) {
                return Err(TrustError::BadSignature {
                    what,
                    signer: format!("a chain from this cluster's authority ({authority})"),
                });
            }
            signer = block.next;
            previous = Some(&block.signature);
        }
        Ok(signer)
    }

    /// The key the last block names: the one its holder signs with.
    pub(crate) fn holder(&self) -> PublicKey {
        self.last().next
    }

    fn last(&self) -> &Block {
        self.blocks.last().expect("a chain has a block")
    }

    /// The last block's signature, which whatever the holder signs covers, so a signature
    /// cannot move to another chain that names the same key.
    pub(crate) fn last_signature(&self) -> &[u8; 64] {
        &self.last().signature
    }

    pub(crate) fn allows(&self, operation: Operation, prefix: &str, now_ms: u64) -> bool {
        self.blocks
            .iter()
            .all(|block| block.allows(operation, prefix, now_ms))
    }

    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(self.blocks.len() as u8);
        for block in &self.blocks {
            out.extend_from_slice(&block.unsigned());
            out.extend_from_slice(&block.signature);
        }
    }

    pub(crate) fn decode_from(reader: &mut Reader<'_>) -> Result<Self, TrustError> {
        let count = usize::from(reader.u8()?);
        if count == 0 || count > MAX_BLOCKS {
            return Err(TrustError::malformed(
                reader.what,
                format!("{count} blocks"),
            ));
        }
        let mut blocks = Vec::with_capacity(count);
        for _ in 0..count {
            let rights_count = usize::from(reader.u8()?);
            let mut rights = Vec::with_capacity(rights_count.min(MAX_RIGHTS));
            for _ in 0..rights_count {
                let operations = reader.u8()?;
                let len = usize::from(u16::from_be_bytes(reader.array()?));
                let prefix = std::str::from_utf8(reader.take(len)?)
                    .map_err(|_| TrustError::malformed(reader.what, "a prefix is not UTF-8"))?;
                if operations == 0 || operations & !7 != 0 || len > MAX_PREFIX {
                    return Err(TrustError::malformed(reader.what, "a malformed right"));
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
        Ok(Self { blocks })
    }
}

/// A capability token (see the module's doc).
#[derive(Clone)]
pub struct Capability {
    chain: Chain,
    proof: [u8; 32],
    /// The proof's key pair, derived once (deriving it costs as much as a signature).
    holder: Arc<OnceLock<Option<Ed25519KeyPair>>>,
}

impl PartialEq for Capability {
    fn eq(&self, other: &Self) -> bool {
        self.chain == other.chain && self.proof == other.proof
    }
}

impl Eq for Capability {}

impl fmt::Debug for Capability {
    /// The proof is a secret: never shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Capability")
            .field("blocks", &self.chain.blocks.len())
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
            chain: Chain {
                blocks: vec![block],
            },
            proof: seed,
            holder: Arc::default(),
        })
    }

    /// A narrower token: this one's rights further limited to `rights` (and, if earlier,
    /// `expires_ms`). Needs nothing but this token.
    pub fn attenuate(&self, rights: Vec<Right>, expires_ms: u64) -> Result<Self, TrustError> {
        if self.chain.blocks.len() >= MAX_BLOCKS {
            return Err(TrustError::malformed(
                "token",
                format!("at most {MAX_BLOCKS} blocks"),
            ));
        }
        let (mut block, seed) = Block::unsigned_with_fresh_key(rights, expires_ms)?;
        let previous = self.chain.last_signature();
        block.signature = self.sign(&block.signed_message(Some(previous)))?;
        let mut chain = self.chain.clone();
        chain.blocks.push(block);
        Ok(Self {
            chain,
            proof: seed,
            holder: Arc::default(),
        })
    }

    /// Checks the chain: the first block signed by `authority`, every later one by the key
    /// its predecessor named, and the proof the secret of the last named key.
    pub fn verify(&self, authority: &PublicKey) -> Result<(), TrustError> {
        let holder = self.chain.verify(authority, "token")?;
        let proof = Ed25519KeyPair::from_seed_unchecked(&self.proof)
            .map_err(|e| TrustError::malformed("token", e.to_string()))?;
        if public_of(&proof) != holder {
            return Err(TrustError::BadSignature {
                what: "token's proof",
                signer: format!("a chain from this cluster's authority ({authority})"),
            });
        }
        Ok(())
    }

    /// Whether the token (already verified) allows `operation` on every key starting with
    /// `prefix` at `now_ms`.
    pub fn allows(&self, operation: Operation, prefix: &str, now_ms: u64) -> bool {
        self.chain.allows(operation, prefix, now_ms)
    }

    /// The key this token's holder signs writes with (the proof's public half): the author
    /// every replica and reader sees on a write this token signed. An attenuated token signs
    /// as a new author.
    pub fn author(&self) -> PublicKey {
        self.chain.holder()
    }

    /// Signs a write of `value` (`None`: a delete) to `key` at `signed_at_ms` (milliseconds
    /// since the Unix epoch), with this token's proof. The attestation carries the token's
    /// blocks but not its proof.
    pub fn sign_write(
        &self,
        key: &str,
        value: Option<&[u8]>,
        signed_at_ms: u64,
    ) -> Result<Attestation, TrustError> {
        let message = Attestation::message(&self.chain, key, value, signed_at_ms);
        Ok(Attestation::new(
            self.chain.clone(),
            signed_at_ms,
            self.sign(&message)?,
        ))
    }

    fn sign(&self, message: &[u8]) -> Result<[u8; 64], TrustError> {
        let holder = self
            .holder
            .get_or_init(|| Ed25519KeyPair::from_seed_unchecked(&self.proof).ok())
            .as_ref()
            .ok_or_else(|| TrustError::malformed("token", "the proof is not a key"))?;
        let mut signature = [0u8; 64];
        signature.copy_from_slice(holder.sign(message).as_ref());
        Ok(signature)
    }

    /// When the token stops working (milliseconds since the Unix epoch), if ever.
    pub fn expires_ms(&self) -> Option<u64> {
        self.chain
            .blocks
            .iter()
            .map(|b| b.expires_ms)
            .filter(|e| *e != 0)
            .min()
    }

    /// Each block's rights, first block first.
    pub fn rights(&self) -> Vec<Vec<String>> {
        self.chain
            .blocks
            .iter()
            .map(|b| b.rights.iter().map(Right::to_string).collect())
            .collect()
    }

    /// The binary form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT];
        self.chain.encode_into(&mut out);
        out.extend_from_slice(&self.proof);
        out
    }

    /// Reads the binary form; refuses trailing bytes. Says nothing of the signatures: see
    /// [`Capability::verify`].
    pub fn decode(bytes: &[u8]) -> Result<Self, TrustError> {
        let mut reader = Reader::new(bytes, "token");
        let format = reader.u8()?;
        if format != FORMAT {
            return Err(TrustError::malformed(
                "token",
                format!("unknown format {format}"),
            ));
        }
        let chain = Chain::decode_from(&mut reader)?;
        let proof = reader.array()?;
        reader.finish()?;
        Ok(Self {
            chain,
            proof,
            holder: Arc::default(),
        })
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

/// Reads a byte string front to back; errors name `what` is being read.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Self { rest: bytes, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], TrustError> {
        if self.rest.len() < n {
            return Err(TrustError::malformed(self.what, "truncated"));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, TrustError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], TrustError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    /// Refuses trailing bytes.
    pub(crate) fn finish(self) -> Result<(), TrustError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(TrustError::malformed(self.what, "trailing bytes"))
        }
    }
}
