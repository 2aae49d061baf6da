//! Client-side verification of the key directory, sans-IO: which signed tree heads (STH) a client
//! accepts, and whether a key entry is in the log under one of them. The caller does the fetching
//! and passes the time; this module only says yes or why not.
//!
//! # Rules
//!
//! A head is accepted by [`DirectoryVerifier::accept_head`] only if all of these hold:
//!
//! 1. it is signed by the trusted directory key (a head naming another key id is
//!    [`DirectoryError::SignedByAnotherKey`], a bad signature [`DirectoryError::BadSignature`]);
//! 2. its timestamp is at most [`MAX_HEAD_AGE_SECS`] (24 h) old and at most
//!    [`MAX_CLOCK_SKEW_SECS`] in the future;
//! 3. it is proven to be a prefix of, or an extension of, the largest head seen so far
//!    ("latest"), with the proof the caller fetched between the two sizes:
//!    - no head seen yet: accepted on first use, and the proof must be empty;
//!    - larger than latest: the proof is `PROOF(latest.size, head.size)`;
//!    - same size as latest or as any remembered head: the roots must be equal, otherwise it is a
//!      [`DirectoryError::Fork`]; no proof is needed (and one for latest's size must be empty);
//!    - smaller than latest and not remembered: the proof is `PROOF(head.size, latest.size)`;
//!    - size 0: must carry the empty root, and is a prefix of anything.
//! 4. timestamps never run backwards along sizes: a larger head is not signed before a smaller one.
//!
//! Since every accepted head is a proven prefix of the latest head, all accepted heads describe
//! one append-only history, so consistency with the latest implies consistency with every head
//! seen. That is why only the [`MAX_REMEMBERED_HEADS`] largest heads need to be kept: a forgotten
//! head can come back only with a proof. A key entry is accepted by
//! [`DirectoryVerifier::verify_key_entry`] only with an inclusion proof under a remembered head
//! that is still fresh.

use chat_signing::merkle::{
    EMPTY_ROOT, Hash, MerkleError, leaf_hash, verify_consistency, verify_inclusion,
};
use chat_signing::tree_head::{DirectoryPublicKey, KeyId, SignedTreeHead, TreeHeadError};
use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer};

/// A head older than this (24 h) is refused, and so are key entries proven under it.
pub const MAX_HEAD_AGE_SECS: u64 = 24 * 60 * 60;
/// How far ahead of the client's clock a head's timestamp may be.
pub const MAX_CLOCK_SKEW_SECS: u64 = 5 * 60;
/// How many distinct tree sizes a verifier remembers (the largest ones).
pub const MAX_REMEMBERED_HEADS: usize = 64;
/// Version byte leading [`DirectoryVerifier::to_bytes`].
pub const STATE_VERSION: u8 = 1;

/// Why a tree head or a key entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DirectoryError {
    #[error(
        "tree head is signed by directory key {}, not by the trusted directory key {}",
        hex::encode(.head_key_id),
        hex::encode(.trusted_key_id)
    )]
    SignedByAnotherKey {
        trusted_key_id: KeyId,
        head_key_id: KeyId,
    },
    #[error("tree head signature does not verify under the trusted directory key")]
    BadSignature,
    #[error(
        "tree head signed at {timestamp} is more than 24 h old at {now} (Unix seconds); fetch a fresh head"
    )]
    Stale { timestamp: u64, now: u64 },
    #[error(
        "tree head signed at {timestamp} is ahead of this device's clock ({now}) by more than {MAX_CLOCK_SKEW_SECS} s; check the clock"
    )]
    FromTheFuture { timestamp: u64, now: u64 },
    #[error("tree head of the empty tree carries a non-empty root")]
    InvalidEmptyHead,
    #[error("fork: the directory signed two different roots for tree size {tree_size}")]
    Fork { tree_size: u64 },
    #[error(
        "the tree of size {old_size} is not proven to be a prefix of the tree of size {new_size}: {source}"
    )]
    Inconsistent {
        old_size: u64,
        new_size: u64,
        source: MerkleError,
    },
    #[error("a consistency proof of {len} hashes came where none is needed")]
    UnexpectedProof { len: usize },
    #[error(
        "tree head of size {tree_size} signed at {timestamp} contradicts the head of size {seen_size} signed at {seen_timestamp}: the log cannot shrink over time"
    )]
    TimestampRegression {
        tree_size: u64,
        timestamp: u64,
        seen_size: u64,
        seen_timestamp: u64,
    },
    #[error("no accepted tree head of size {tree_size} has this root; accept the head first")]
    HeadNotAccepted { tree_size: u64 },
    #[error("key entry {index} is not proven to be in the tree of size {tree_size}: {source}")]
    NotIncluded {
        index: u64,
        tree_size: u64,
        source: MerkleError,
    },
}

/// One accepted tree size, with the earliest and latest signing times seen for it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SeenHead {
    tree_size: u64,
    root: Hash,
    first_timestamp: u64,
    last_timestamp: u64,
}

/// What a client knows about the key directory: its public key and the heads it accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryVerifier {
    key: DirectoryPublicKey,
    /// Sorted by strictly increasing `tree_size`; the last one is the latest.
    heads: Vec<SeenHead>,
}

impl DirectoryVerifier {
    /// A verifier that has seen no head yet.
    pub fn new(key: DirectoryPublicKey) -> Self {
        Self {
            key,
            heads: Vec::new(),
        }
    }

    pub fn public_key(&self) -> &DirectoryPublicKey {
        &self.key
    }

    /// Size and root of the largest head accepted, from which the next consistency proof starts.
    pub fn latest(&self) -> Option<(u64, Hash)> {
        self.heads.last().map(|h| (h.tree_size, h.root))
    }

    /// Applies the rules of the module documentation to `head`; `consistency_proof` relates it to
    /// [`Self::latest`] (from the smaller of the two sizes to the larger).
    pub fn accept_head(
        &mut self,
        head: &SignedTreeHead,
        consistency_proof: &[Hash],
        now_unix_secs: u64,
    ) -> Result<(), DirectoryError> {
        head.verify(&self.key).map_err(|e| match e {
            TreeHeadError::WrongKey {
                trusted_key_id,
                head_key_id,
            } => DirectoryError::SignedByAnotherKey {
                trusted_key_id,
                head_key_id,
            },
            _ => DirectoryError::BadSignature,
        })?;
        check_fresh(head.timestamp, now_unix_secs)?;
        if head.tree_size == 0 && head.root != EMPTY_ROOT {
            return Err(DirectoryError::InvalidEmptyHead);
        }
        self.check_consistent(head, consistency_proof)?;
        self.check_timestamp_order(head)?;
        self.remember(head);
        Ok(())
    }

    /// Accepts the key entry `entry_leaf_bytes` (the log entry, hashed here as an RFC 9162 leaf)
    /// only if `inclusion_proof` puts it at `index` under `head`, which must have been accepted
    /// and must still be fresh at `now_unix_secs` (its latest signing time counts).
    pub fn verify_key_entry(
        &self,
        entry_leaf_bytes: &[u8],
        index: u64,
        inclusion_proof: &[Hash],
        head: &SignedTreeHead,
        now_unix_secs: u64,
    ) -> Result<(), DirectoryError> {
        let seen = self
            .heads
            .iter()
            .find(|h| h.tree_size == head.tree_size && h.root == head.root)
            .ok_or(DirectoryError::HeadNotAccepted {
                tree_size: head.tree_size,
            })?;
        check_fresh(seen.last_timestamp, now_unix_secs)?;
        verify_inclusion(
            &leaf_hash(entry_leaf_bytes),
            index,
            seen.tree_size,
            inclusion_proof,
            &seen.root,
        )
        .map_err(|source| DirectoryError::NotIncluded {
            index,
            tree_size: seen.tree_size,
            source,
        })
    }

    /// `version (1) || public key (32) || count (u32) || count × (size u64, root 32,
    /// first timestamp u64, last timestamp u64)`, in increasing size.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(1 + 32 + 4 + self.heads.len() * 56);
        w.u8(STATE_VERSION).fixed(&self.key.to_bytes());
        w.u32(u32::try_from(self.heads.len()).unwrap_or(u32::MAX));
        for h in &self.heads {
            w.u64(h.tree_size)
                .fixed(&h.root)
                .u64(h.first_timestamp)
                .u64(h.last_timestamp);
        }
        w.into_bytes()
    }

    /// Restores [`Self::to_bytes`]. The caller should check [`Self::public_key`] against the key
    /// it was built with.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != STATE_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "directory verifier state",
                version,
            });
        }
        let key = DirectoryPublicKey::from_bytes(&r.array()?)
            .map_err(|_| DecodeError::Invalid("directory public key"))?;
        let offset = r.offset();
        let count = r.u32()? as usize;
        if count > MAX_REMEMBERED_HEADS {
            return Err(DecodeError::TooLong {
                offset,
                len: count,
                limit: MAX_REMEMBERED_HEADS,
            });
        }
        let mut heads: Vec<SeenHead> = Vec::with_capacity(count);
        for _ in 0..count {
            let head = SeenHead {
                tree_size: r.u64()?,
                root: r.array()?,
                first_timestamp: r.u64()?,
                last_timestamp: r.u64()?,
            };
            if heads
                .last()
                .is_some_and(|prev| prev.tree_size >= head.tree_size)
            {
                return Err(DecodeError::Invalid("order of remembered tree heads"));
            }
            if head.first_timestamp > head.last_timestamp {
                return Err(DecodeError::Invalid("timestamps of a remembered tree head"));
            }
            if head.tree_size == 0 && head.root != EMPTY_ROOT {
                return Err(DecodeError::Invalid("root of the empty tree"));
            }
            heads.push(head);
        }
        r.finish()?;
        Ok(Self { key, heads })
    }

    fn check_consistent(
        &self,
        head: &SignedTreeHead,
        proof: &[Hash],
    ) -> Result<(), DirectoryError> {
        let Some(latest) = self.heads.last() else {
            return expect_no_proof(proof);
        };
        let size = head.tree_size;
        if let Some(seen) = self.heads.iter().find(|h| h.tree_size == size) {
            if seen.root != head.root {
                return Err(DirectoryError::Fork { tree_size: size });
            }
            // Same size as the latest: the proof between them is empty by definition.
            return if size == latest.tree_size {
                expect_no_proof(proof)
            } else {
                Ok(())
            };
        }
        if size == 0 || latest.tree_size == 0 {
            // The empty tree is a prefix of every tree.
            return expect_no_proof(proof);
        }
        let (old_size, new_size, old_root, new_root) = if size > latest.tree_size {
            (latest.tree_size, size, &latest.root, &head.root)
        } else {
            (size, latest.tree_size, &head.root, &latest.root)
        };
        verify_consistency(old_size, new_size, old_root, new_root, proof).map_err(|source| {
            DirectoryError::Inconsistent {
                old_size,
                new_size,
                source,
            }
        })
    }

    /// The log only grows: a head of size `s` signed at `t` and a head of size `s' > s` signed
    /// at `t' < t` cannot both be true.
    fn check_timestamp_order(&self, head: &SignedTreeHead) -> Result<(), DirectoryError> {
        for seen in &self.heads {
            let contradicting = if seen.tree_size < head.tree_size {
                Some(seen.last_timestamp).filter(|&t| t > head.timestamp)
            } else if seen.tree_size > head.tree_size {
                Some(seen.first_timestamp).filter(|&t| t < head.timestamp)
            } else {
                None
            };
            if let Some(seen_timestamp) = contradicting {
                return Err(DirectoryError::TimestampRegression {
                    tree_size: head.tree_size,
                    timestamp: head.timestamp,
                    seen_size: seen.tree_size,
                    seen_timestamp,
                });
            }
        }
        Ok(())
    }

    fn remember(&mut self, head: &SignedTreeHead) {
        match self
            .heads
            .binary_search_by_key(&head.tree_size, |h| h.tree_size)
        {
            Ok(i) => {
                let seen = &mut self.heads[i];
                seen.first_timestamp = seen.first_timestamp.min(head.timestamp);
                seen.last_timestamp = seen.last_timestamp.max(head.timestamp);
            }
            Err(i) => self.heads.insert(
                i,
                SeenHead {
                    tree_size: head.tree_size,
                    root: head.root,
                    first_timestamp: head.timestamp,
                    last_timestamp: head.timestamp,
                },
            ),
        }
        // Forget the smallest sizes first, but not the head just accepted.
        while self.heads.len() > MAX_REMEMBERED_HEADS {
            let victim = usize::from(self.heads[0].tree_size == head.tree_size);
            self.heads.remove(victim);
        }
    }
}

fn check_fresh(timestamp: u64, now: u64) -> Result<(), DirectoryError> {
    if timestamp > now.saturating_add(MAX_CLOCK_SKEW_SECS) {
        return Err(DirectoryError::FromTheFuture { timestamp, now });
    }
    if now.saturating_sub(timestamp) > MAX_HEAD_AGE_SECS {
        return Err(DirectoryError::Stale { timestamp, now });
    }
    Ok(())
}

fn expect_no_proof(proof: &[Hash]) -> Result<(), DirectoryError> {
    if proof.is_empty() {
        Ok(())
    } else {
        Err(DirectoryError::UnexpectedProof { len: proof.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_signing::merkle::MerkleLog;
    use chat_signing::tree_head::DirectorySigningKey;
    use proptest::prelude::*;

    const NOW: u64 = 1_750_000_000;
    const HOUR: u64 = 3600;

    fn entry(i: u64) -> Vec<u8> {
        format!("user{i}/device0/identity-key-{i}").into_bytes()
    }

    /// A directory: its key and a log of `size` entries.
    fn directory(size: u64) -> (DirectorySigningKey, MerkleLog) {
        let key = DirectorySigningKey::from_seed(&[7; 32]);
        let mut log = MerkleLog::new();
        for i in 0..size {
            log.push(&entry(i));
        }
        (key, log)
    }

    fn head_at(key: &DirectorySigningKey, log: &MerkleLog, size: u64, at: u64) -> SignedTreeHead {
        key.sign_tree_head(size, &log.root_at(size).expect("size in log"), at)
    }

    fn verifier(key: &DirectorySigningKey) -> DirectoryVerifier {
        DirectoryVerifier::new(key.public_key())
    }

    /// A verifier that has accepted the head of size 5 signed an hour ago.
    fn verifier_at_5(key: &DirectorySigningKey, log: &MerkleLog) -> DirectoryVerifier {
        let mut v = verifier(key);
        v.accept_head(&head_at(key, log, 5, NOW - HOUR), &[], NOW)
            .expect("first head");
        v
    }

    #[test]
    fn accepts_consistent_fresh_heads_and_key_entries_included_under_them() {
        let (key, log) = directory(12);
        let mut v = verifier_at_5(&key, &log);
        let head12 = head_at(&key, &log, 12, NOW);
        let proof = log.consistency_proof(5, 12).expect("in range");
        assert_eq!(v.accept_head(&head12, &proof, NOW), Ok(()));
        assert_eq!(v.latest(), Some((12, log.root())));
        for i in [0, 3, 4, 10, 11] {
            let path = log.inclusion_proof(i, 12).expect("in range");
            assert_eq!(
                v.verify_key_entry(&entry(i), i, &path, &head12, NOW),
                Ok(())
            );
        }
        let head5 = head_at(&key, &log, 5, NOW - HOUR);
        let path = log.inclusion_proof(3, 5).expect("in range");
        assert_eq!(v.verify_key_entry(&entry(3), 3, &path, &head5, NOW), Ok(()));
    }

    #[test]
    fn refuses_key_entry_without_valid_inclusion_proof() {
        let (key, log) = directory(12);
        let mut v = verifier(&key);
        let head = head_at(&key, &log, 12, NOW);
        v.accept_head(&head, &[], NOW).expect("first head");
        let path = log.inclusion_proof(3, 12).expect("in range");
        // Another entry at the same index (the server swapped a key).
        assert!(matches!(
            v.verify_key_entry(b"user3/device0/attacker-key", 3, &path, &head, NOW),
            Err(DirectoryError::NotIncluded {
                index: 3,
                tree_size: 12,
                source: MerkleError::RootMismatch
            })
        ));
        // The right entry, claimed at another index.
        assert!(matches!(
            v.verify_key_entry(&entry(3), 2, &path, &head, NOW),
            Err(DirectoryError::NotIncluded { .. })
        ));
        // A proof for another leaf, a truncated proof, no proof.
        let other = log.inclusion_proof(4, 12).expect("in range");
        for bad in [&other[..], &path[..path.len() - 1], &[]] {
            assert!(matches!(
                v.verify_key_entry(&entry(3), 3, bad, &head, NOW),
                Err(DirectoryError::NotIncluded { .. })
            ));
        }
        // An index beyond the tree.
        assert!(matches!(
            v.verify_key_entry(&entry(3), 12, &path, &head, NOW),
            Err(DirectoryError::NotIncluded {
                source: MerkleError::IndexOutOfRange { .. },
                ..
            })
        ));
    }

    #[test]
    fn refuses_key_entry_under_a_head_never_accepted() {
        let (key, log) = directory(12);
        let v = verifier_at_5(&key, &log);
        let head12 = head_at(&key, &log, 12, NOW);
        let path = log.inclusion_proof(3, 12).expect("in range");
        assert_eq!(
            v.verify_key_entry(&entry(3), 3, &path, &head12, NOW),
            Err(DirectoryError::HeadNotAccepted { tree_size: 12 })
        );
    }

    #[test]
    fn refuses_key_entry_once_its_head_is_stale() {
        let (key, log) = directory(12);
        let mut v = verifier(&key);
        let head = head_at(&key, &log, 12, NOW);
        v.accept_head(&head, &[], NOW).expect("first head");
        let path = log.inclusion_proof(3, 12).expect("in range");
        let later = NOW + MAX_HEAD_AGE_SECS + 1;
        assert_eq!(
            v.verify_key_entry(&entry(3), 3, &path, &head, later),
            Err(DirectoryError::Stale {
                timestamp: NOW,
                now: later
            })
        );
        // The same tree size re-signed later makes it fresh again.
        v.accept_head(&head_at(&key, &log, 12, later), &[], later)
            .expect("re-signed head");
        assert_eq!(
            v.verify_key_entry(&entry(3), 3, &path, &head, later),
            Ok(())
        );
    }

    #[test]
    fn refuses_head_inconsistent_with_heads_seen() {
        // The fork shares the first 7 entries, then shows a different key for user 7.
        let (key, log) = directory(12);
        let mut forked = MerkleLog::new();
        for i in 0..12 {
            forked.push(&if i == 7 {
                b"user7/device0/attacker-key".to_vec()
            } else {
                entry(i)
            });
        }
        let mut v = verifier(&key);
        v.accept_head(&head_at(&key, &log, 8, NOW - HOUR), &[], NOW)
            .expect("first head");
        let fork12 = head_at(&key, &forked, 12, NOW);
        let proof = forked.consistency_proof(8, 12).expect("in range");
        assert!(matches!(
            v.accept_head(&fork12, &proof, NOW),
            Err(DirectoryError::Inconsistent {
                old_size: 8,
                new_size: 12,
                ..
            })
        ));
        // Nor does the honest log's proof help the forked root.
        let honest = log.consistency_proof(8, 12).expect("in range");
        assert!(v.accept_head(&fork12, &honest, NOW).is_err());
        assert!(v.accept_head(&fork12, &[], NOW).is_err());
        assert_eq!(v.latest(), Some((8, log.root_at(8).expect("in range"))));
    }

    #[test]
    fn refuses_same_size_head_with_another_root_as_a_fork() {
        let (key, log) = directory(12);
        let mut v = verifier_at_5(&key, &log);
        let mut other = MerkleLog::new();
        for i in 0..5 {
            other.push(&entry(i + 100));
        }
        assert_eq!(
            v.accept_head(&head_at(&key, &other, 5, NOW), &[], NOW),
            Err(DirectoryError::Fork { tree_size: 5 })
        );
        // Also for a remembered head that is no longer the latest.
        let proof = log.consistency_proof(5, 12).expect("in range");
        v.accept_head(&head_at(&key, &log, 12, NOW), &proof, NOW)
            .expect("extension");
        assert_eq!(
            v.accept_head(&head_at(&key, &other, 5, NOW), &[], NOW),
            Err(DirectoryError::Fork { tree_size: 5 })
        );
    }

    #[test]
    fn accepts_older_head_only_when_proven_a_prefix_of_the_latest() {
        let (key, log) = directory(12);
        let mut v = verifier(&key);
        v.accept_head(&head_at(&key, &log, 12, NOW), &[], NOW)
            .expect("first head");
        let head7 = head_at(&key, &log, 7, NOW - HOUR);
        assert!(matches!(
            v.accept_head(&head7, &[], NOW),
            Err(DirectoryError::Inconsistent { .. })
        ));
        let proof = log.consistency_proof(7, 12).expect("in range");
        assert_eq!(v.accept_head(&head7, &proof, NOW), Ok(()));
        assert_eq!(v.latest(), Some((12, log.root())));
        // Once remembered, the same head needs no proof.
        assert_eq!(v.accept_head(&head7, &[], NOW), Ok(()));
    }

    #[test]
    fn refuses_head_signed_by_another_key() {
        let (key, log) = directory(12);
        let mut v = verifier(&key);
        let other = DirectorySigningKey::from_seed(&[8; 32]);
        assert_eq!(
            v.accept_head(&head_at(&other, &log, 12, NOW), &[], NOW),
            Err(DirectoryError::SignedByAnotherKey {
                trusted_key_id: key.public_key().key_id(),
                head_key_id: other.public_key().key_id(),
            })
        );
        // Claiming the trusted key id does not help: the signature is then wrong.
        let mut forged = head_at(&other, &log, 12, NOW);
        forged.key_id = key.public_key().key_id();
        assert_eq!(
            v.accept_head(&forged, &[], NOW),
            Err(DirectoryError::BadSignature)
        );
        assert_eq!(v.latest(), None);
    }

    #[test]
    fn refuses_head_whose_fields_were_altered_after_signing() {
        let (key, log) = directory(12);
        let mut v = verifier(&key);
        let mut head = head_at(&key, &log, 12, NOW - 2 * MAX_HEAD_AGE_SECS);
        head.timestamp = NOW;
        assert_eq!(
            v.accept_head(&head, &[], NOW),
            Err(DirectoryError::BadSignature)
        );
    }

    #[test]
    fn refuses_stale_head() {
        let (key, log) = directory(12);
        let mut v = verifier(&key);
        let signed_at = NOW - MAX_HEAD_AGE_SECS - 1;
        assert_eq!(
            v.accept_head(&head_at(&key, &log, 12, signed_at), &[], NOW),
            Err(DirectoryError::Stale {
                timestamp: signed_at,
                now: NOW
            })
        );
        let just_fresh = head_at(&key, &log, 12, NOW - MAX_HEAD_AGE_SECS);
        assert_eq!(v.accept_head(&just_fresh, &[], NOW), Ok(()));
    }

    #[test]
    fn refuses_head_from_the_future() {
        let (key, log) = directory(12);
        let mut v = verifier(&key);
        let ahead = NOW + MAX_CLOCK_SKEW_SECS + 1;
        assert_eq!(
            v.accept_head(&head_at(&key, &log, 12, ahead), &[], NOW),
            Err(DirectoryError::FromTheFuture {
                timestamp: ahead,
                now: NOW
            })
        );
        let within_skew = head_at(&key, &log, 12, NOW + MAX_CLOCK_SKEW_SECS);
        assert_eq!(v.accept_head(&within_skew, &[], NOW), Ok(()));
    }

    #[test]
    fn refuses_larger_head_signed_before_a_smaller_one() {
        let (key, log) = directory(12);
        let mut v = verifier_at_5(&key, &log);
        let proof = log.consistency_proof(5, 12).expect("in range");
        let earlier = NOW - 2 * HOUR;
        assert_eq!(
            v.accept_head(&head_at(&key, &log, 12, earlier), &proof, NOW),
            Err(DirectoryError::TimestampRegression {
                tree_size: 12,
                timestamp: earlier,
                seen_size: 5,
                seen_timestamp: NOW - HOUR,
            })
        );
    }

    #[test]
    fn refuses_unexpected_proof_and_bad_empty_heads() {
        let (key, log) = directory(12);
        let mut v = verifier(&key);
        let proof = log.consistency_proof(5, 12).expect("in range");
        assert_eq!(
            v.accept_head(&head_at(&key, &log, 12, NOW), &proof, NOW),
            Err(DirectoryError::UnexpectedProof { len: proof.len() })
        );
        let bad_empty = key.sign_tree_head(0, &log.root(), NOW);
        assert_eq!(
            v.accept_head(&bad_empty, &[], NOW),
            Err(DirectoryError::InvalidEmptyHead)
        );
        // The genuine empty head is a prefix of everything.
        assert_eq!(
            v.accept_head(&head_at(&key, &log, 0, NOW), &[], NOW),
            Ok(())
        );
        assert_eq!(
            v.accept_head(&head_at(&key, &log, 12, NOW), &[], NOW),
            Ok(())
        );
    }

    #[test]
    fn remembers_a_bounded_number_of_heads_and_still_refuses_forks() {
        let (key, log) = directory(100);
        let mut v = verifier(&key);
        v.accept_head(&head_at(&key, &log, 1, NOW), &[], NOW)
            .expect("first head");
        for size in 2..=100 {
            let proof = log.consistency_proof(size - 1, size).expect("in range");
            v.accept_head(&head_at(&key, &log, size, NOW), &proof, NOW)
                .expect("extension");
        }
        assert_eq!(v.heads.len(), MAX_REMEMBERED_HEADS);
        assert_eq!(v.latest(), Some((100, log.root())));
        // A forgotten size needs a proof again, and a wrong root for it is refused.
        let mut other = MerkleLog::new();
        other.push(b"forged");
        assert!(
            v.accept_head(&head_at(&key, &other, 1, NOW), &[], NOW)
                .is_err()
        );
        let proof = log.consistency_proof(1, 100).expect("in range");
        assert_eq!(
            v.accept_head(&head_at(&key, &log, 1, NOW), &proof, NOW),
            Ok(())
        );
        assert_eq!(v.heads.len(), MAX_REMEMBERED_HEADS);
        assert!(v.heads.iter().any(|h| h.tree_size == 1));
    }

    #[test]
    fn state_round_trips_through_bytes() {
        let (key, log) = directory(12);
        let mut v = verifier_at_5(&key, &log);
        let proof = log.consistency_proof(5, 12).expect("in range");
        v.accept_head(&head_at(&key, &log, 12, NOW), &proof, NOW)
            .expect("extension");
        let restored = DirectoryVerifier::from_bytes(&v.to_bytes()).expect("decodes");
        assert_eq!(restored, v);
        assert_eq!(
            DirectoryVerifier::from_bytes(&verifier(&key).to_bytes()),
            Ok(verifier(&key))
        );
    }

    #[test]
    fn refuses_state_of_unknown_version_or_disordered_heads() {
        let (key, log) = directory(12);
        let mut v = verifier_at_5(&key, &log);
        let proof = log.consistency_proof(5, 12).expect("in range");
        v.accept_head(&head_at(&key, &log, 12, NOW), &proof, NOW)
            .expect("extension");
        let mut bytes = v.to_bytes();
        bytes[0] = 2;
        assert!(matches!(
            DirectoryVerifier::from_bytes(&bytes),
            Err(DecodeError::UnsupportedVersion { version: 2, .. })
        ));
        let mut swapped = v.clone();
        swapped.heads.swap(0, 1);
        assert_eq!(
            DirectoryVerifier::from_bytes(&swapped.to_bytes()),
            Err(DecodeError::Invalid("order of remembered tree heads"))
        );
        let bytes = v.to_bytes();
        assert!(matches!(
            DirectoryVerifier::from_bytes(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Truncated { .. })
        ));
    }

    proptest! {
        #[test]
        fn state_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = DirectoryVerifier::from_bytes(&bytes);
        }
    }
}
