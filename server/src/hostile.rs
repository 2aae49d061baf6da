//! Test-only hostile behaviours (cargo feature `hostile`, binary `chat-server-hostile`): the
//! attacks of `docs/THREAT_MODEL.md` that a malicious server can try, so tests can show that
//! clients catch each one. Never compiled into release builds.

use std::collections::HashMap;
use std::sync::Mutex;

use chat_core::identity::DeviceKeys;
use chat_core::wire::{DeviceBundle, DirectoryLeaf, SignedPrekey};
use chat_signing::merkle::MerkleLog;
use chat_signing::tree_head::{DirectorySigningKey, SignedTreeHead};
use rand_core::OsRng;

/// Which attack the server mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HostileMode {
    /// Hand out attacker keys in bundles; the directory still holds the real ones.
    SubstituteBundle,
    /// Hand out attacker keys and claim they are the directory leaf, with the real proof.
    BadInclusion,
    /// Sign tree heads with a key that is not the directory key.
    ForeignHead,
    /// Present a forked history: heads over a log whose first leaf was rewritten.
    Fork,
}

/// Attacker state: the substituted device keys, a foreign signing key.
pub struct Hostile {
    pub mode: HostileMode,
    substitutes: Mutex<HashMap<(String, u32), DeviceKeys>>,
    foreign_key: DirectorySigningKey,
}

impl std::fmt::Debug for Hostile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hostile")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Hostile {
    pub fn new(mode: HostileMode) -> Self {
        tracing::warn!(
            ?mode,
            "HOSTILE SERVER MODE: this server attacks its clients (tests only)"
        );
        Self {
            mode,
            substitutes: Mutex::new(HashMap::new()),
            foreign_key: DirectorySigningKey::generate(&mut OsRng),
        }
    }

    fn substitute(
        &self,
        user: &str,
        device: u32,
    ) -> (
        chat_core::identity::IdentityPublic,
        chat_core::identity::SignedPreKey,
    ) {
        let mut map = self.substitutes.lock().unwrap_or_else(|e| e.into_inner());
        let keys = map
            .entry((user.to_owned(), device))
            .or_insert_with(|| DeviceKeys::generate(&mut OsRng));
        (*keys.identity().public(), *keys.signed_prekey())
    }

    /// Rewrites a bundle to carry attacker keys (modes that substitute keys).
    pub fn bundle(&self, user: &str, mut device: DeviceBundle) -> DeviceBundle {
        if !matches!(
            self.mode,
            HostileMode::SubstituteBundle | HostileMode::BadInclusion
        ) {
            return device;
        }
        let (identity, spk) = self.substitute(user, device.device_id);
        let encoded = identity.encode();
        device.identity_ed25519 = *identity.signing_key().as_bytes();
        device.identity_x25519 = *identity.dh_key().as_bytes();
        if let Ok(sig) = encoded[65..129].try_into() {
            device.identity_signature = sig;
        }
        device.signed_prekey = SignedPrekey {
            id: spk.id,
            public: *spk.key.as_bytes(),
            signature: spk.signature.to_bytes(),
        };
        device.one_time_prekey = None;
        device
    }

    /// Rewrites an inclusion answer's leaf to the attacker keys (mode `BadInclusion`).
    pub fn leaf(&self, leaf_bytes: Vec<u8>) -> Vec<u8> {
        if self.mode != HostileMode::BadInclusion {
            return leaf_bytes;
        }
        let Ok(mut leaf) = DirectoryLeaf::decode(&leaf_bytes) else {
            return leaf_bytes;
        };
        let (identity, spk) = self.substitute(&leaf.username, leaf.device_id);
        let encoded = identity.encode();
        leaf.identity_ed25519 = *identity.signing_key().as_bytes();
        leaf.identity_x25519 = *identity.dh_key().as_bytes();
        if let Ok(sig) = encoded[65..129].try_into() {
            leaf.identity_signature = sig;
        }
        leaf.signed_prekey_id = spk.id;
        leaf.signed_prekey_public = *spk.key.as_bytes();
        leaf.signed_prekey_signature = spk.signature.to_bytes();
        leaf.encode()
    }

    /// What to answer instead of the honest head, in the head-forging modes.
    pub fn head(
        &self,
        honest: &SignedTreeHead,
        leaves: &[Vec<u8>],
        known_size: Option<u64>,
    ) -> ForgedHead {
        match self.mode {
            HostileMode::ForeignHead => ForgedHead::Signed(self.foreign_key.sign_tree_head(
                honest.tree_size,
                &honest.root,
                honest.timestamp,
            )),
            HostileMode::Fork => {
                // Same size, but leaf 0 rewritten: a history the client never saw, signed with
                // the real directory key (a compromised server holds it).
                let mut forked = MerkleLog::new();
                for (i, leaf) in leaves.iter().enumerate() {
                    forked.push(if i == 0 {
                        b"forged first leaf".as_slice()
                    } else {
                        leaf
                    });
                }
                let size = forked.len();
                let proof = match known_size {
                    Some(k) if k > 0 && k < size => {
                        forked.consistency_proof(k, size).unwrap_or_default()
                    }
                    _ => Vec::new(),
                };
                ForgedHead::Unsigned {
                    size,
                    root: forked.root(),
                    proof,
                }
            }
            _ => ForgedHead::Honest,
        }
    }
}

/// The head a hostile server answers with.
#[derive(Debug)]
pub enum ForgedHead {
    Honest,
    /// A complete forged head (signed by a foreign key).
    Signed(SignedTreeHead),
    /// A forged tree to be signed with the real directory key.
    Unsigned {
        size: u64,
        root: [u8; 32],
        proof: Vec<[u8; 32]>,
    },
}
