//! The key directory as a transparency log: every registration or key change appends a
//! `DirectoryLeaf` to an RFC 9162 Merkle log, and tree heads are signed with the directory key.
//!
//! The leaves are durable in the `Store`; the Merkle tree is rebuilt from them at start and kept
//! in memory. Several instances may share the store (NATS): before every append, head, proof
//! and device lookup the tree catches up with the leaves other instances appended. Heads are signed at most once a second (a background tick, or on demand when a
//! client asks and the log has grown), and re-signed hourly so clients always find a head younger
//! than their 24 h freshness limit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chat_core::wire::DirectoryLeaf;
use chat_signing::merkle::{Hash, MerkleLog};
use chat_signing::tree_head::{DirectorySigningKey, SignedTreeHead};
use tokio::sync::Mutex;

use crate::store::{Store, StoreError};

/// Minimum time between two signed heads.
pub const SIGNING_INTERVAL: Duration = Duration::from_secs(1);
/// A head older than this is re-signed even if the log did not grow.
pub const RESIGN_AFTER: Duration = Duration::from_secs(3600);
/// Leaves read from the store per batch when rebuilding the tree.
const REPLAY_BATCH: u64 = 1024;

/// The current leaf of one device.
#[derive(Debug, Clone, Copy)]
pub struct DeviceEntry {
    pub leaf_index: u64,
    pub version: u64,
}

#[derive(Debug)]
struct LogState {
    tree: MerkleLog,
    /// (username, device) -> its latest leaf.
    devices: HashMap<(String, u32), DeviceEntry>,
    head: Option<SignedTreeHead>,
    signed_at: Option<Instant>,
}

/// The directory of one server.
pub struct Directory {
    state: Mutex<LogState>,
    key: DirectorySigningKey,
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory").finish_non_exhaustive()
    }
}

/// Why a directory operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("leaf {index} in the store is corrupt: {reason}")]
    CorruptLeaf { index: u64, reason: String },
    #[error("{0}")]
    Proof(#[from] chat_signing::merkle::MerkleError),
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl Directory {
    /// Rebuilds the tree from the leaves in the store.
    pub async fn open(
        store: Arc<dyn Store>,
        key: DirectorySigningKey,
    ) -> Result<Self, DirectoryError> {
        let mut state = LogState {
            tree: MerkleLog::new(),
            devices: HashMap::new(),
            head: None,
            signed_at: None,
        };
        catch_up(store.as_ref(), &mut state, None).await?;
        let tree = &state.tree;
        let head = match store.latest_tree_head().await? {
            Some(bytes) => SignedTreeHead::from_bytes(&bytes).ok().filter(|h| {
                h.tree_size <= tree.len() && tree.root_at(h.tree_size).ok() == Some(h.root)
            }),
            None => None,
        };
        state.head = head;
        Ok(Self {
            state: Mutex::new(state),
            key,
            store,
        })
    }

    /// The current entry of a device, if registered.
    pub async fn device(&self, username: &str, device_id: u32) -> Option<DeviceEntry> {
        let state = self.synced().await;
        state
            .devices
            .get(&(username.to_owned(), device_id))
            .copied()
    }

    /// Every registered device of a user, sorted by id.
    pub async fn devices_of(&self, username: &str) -> Vec<(u32, DeviceEntry)> {
        let state = self.synced().await;
        let mut out: Vec<(u32, DeviceEntry)> = state
            .devices
            .iter()
            .filter(|((user, _), _)| user == username)
            .map(|((_, device), entry)| (*device, *entry))
            .collect();
        out.sort_by_key(|(device, _)| *device);
        out
    }

    /// Appends a leaf durably, then to the tree. `leaf.version` is set to the next version of
    /// that device. Returns the leaf index.
    pub async fn append(&self, mut leaf: DirectoryLeaf) -> Result<u64, DirectoryError> {
        let mut state = self.state.lock().await;
        catch_up(self.store.as_ref(), &mut state, None).await?;
        let key = (leaf.username.clone(), leaf.device_id);
        leaf.version = state.devices.get(&key).map_or(1, |e| e.version + 1);
        let bytes = leaf.encode();
        let stored_index = self.store.append_leaf(bytes.clone()).await?;
        // Other instances may have appended since the catch-up: take their leaves first.
        catch_up(self.store.as_ref(), &mut state, Some(stored_index)).await?;
        let index = state.tree.push(&bytes);
        if stored_index != index {
            return Err(DirectoryError::CorruptLeaf {
                index,
                reason: format!("the store placed the leaf at {stored_index}"),
            });
        }
        state.devices.insert(
            key,
            DeviceEntry {
                leaf_index: index,
                version: leaf.version,
            },
        );
        Ok(index)
    }

    /// The latest signed head covering every leaf appended so far, signing a new one when the
    /// log grew (no more often than [`SIGNING_INTERVAL`]) or the last is older than [`RESIGN_AFTER`].
    pub async fn head(&self) -> Result<SignedTreeHead, DirectoryError> {
        loop {
            let wait = {
                let mut state = self.state.lock().await;
                catch_up(self.store.as_ref(), &mut state, None).await?;
                match self.needs_signing(&state) {
                    None => {
                        if let Some(head) = state.head.clone() {
                            return Ok(head);
                        }
                        return self.sign_locked(&mut state).await;
                    }
                    Some(Duration::ZERO) => return self.sign_locked(&mut state).await,
                    Some(wait) => wait,
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// `None`: the current head is fine. `Some(d)`: sign after waiting `d`.
    fn needs_signing(&self, state: &LogState) -> Option<Duration> {
        let Some(head) = &state.head else {
            return Some(Duration::ZERO);
        };
        let stale = unix_now().saturating_sub(head.timestamp) >= RESIGN_AFTER.as_secs();
        if head.tree_size == state.tree.len() && !stale {
            return None;
        }
        let since = state.signed_at.map_or(SIGNING_INTERVAL, |t| t.elapsed());
        Some(SIGNING_INTERVAL.saturating_sub(since))
    }

    async fn sign_locked(&self, state: &mut LogState) -> Result<SignedTreeHead, DirectoryError> {
        let size = state.tree.len();
        let head = self
            .key
            .sign_tree_head(size, &state.tree.root(), unix_now());
        self.store.put_tree_head(head.to_bytes().to_vec()).await?;
        state.head = Some(head.clone());
        state.signed_at = Some(Instant::now());
        tracing::debug!(tree_size = size, "signed a new tree head");
        Ok(head)
    }

    /// Signs a head if one is due; called by the background tick.
    pub async fn tick(&self) -> Result<(), DirectoryError> {
        let mut state = self.state.lock().await;
        catch_up(self.store.as_ref(), &mut state, None).await?;
        if self.needs_signing(&state) == Some(Duration::ZERO) {
            self.sign_locked(&mut state).await?;
        }
        Ok(())
    }

    /// The consistency proof from `old_size` to the size of `head`.
    pub async fn consistency(
        &self,
        old_size: u64,
        head: &SignedTreeHead,
    ) -> Result<Vec<Hash>, DirectoryError> {
        let mut state = self.state.lock().await;
        catch_up(self.store.as_ref(), &mut state, Some(head.tree_size)).await?;
        Ok(state.tree.consistency_proof(old_size, head.tree_size)?)
    }

    /// The inclusion proof of a device's current leaf under `head`, with the leaf index.
    pub async fn inclusion(
        &self,
        username: &str,
        device_id: u32,
        head: &SignedTreeHead,
    ) -> Result<Option<(u64, Vec<Hash>)>, DirectoryError> {
        let mut state = self.state.lock().await;
        catch_up(self.store.as_ref(), &mut state, None).await?;
        let Some(entry) = state.devices.get(&(username.to_owned(), device_id)) else {
            return Ok(None);
        };
        if entry.leaf_index >= head.tree_size {
            return Ok(None);
        }
        Ok(Some((
            entry.leaf_index,
            state
                .tree
                .inclusion_proof(entry.leaf_index, head.tree_size)?,
        )))
    }

    /// Leaves `[start, start + count)` that exist.
    pub async fn leaves(&self, start: u64, count: u32) -> Result<Vec<Vec<u8>>, DirectoryError> {
        Ok(self.store.leaves(start, u64::from(count)).await?)
    }

    /// Signs any (size, root): what a compromised server can do. Test-only.
    #[cfg(feature = "hostile")]
    pub fn sign_forged(&self, size: u64, root: &Hash) -> SignedTreeHead {
        self.key.sign_tree_head(size, root, unix_now())
    }

    /// Number of leaves in the log.
    pub async fn size(&self) -> u64 {
        self.synced().await.tree.len()
    }

    /// The state, caught up with the store if it can be (a store error is logged and the
    /// state used as it is: callers of this cannot report errors).
    async fn synced(&self) -> tokio::sync::MutexGuard<'_, LogState> {
        let mut state = self.state.lock().await;
        if let Err(e) = catch_up(self.store.as_ref(), &mut state, None).await {
            tracing::warn!(error = %e, "cannot catch up with the directory log");
        }
        state
    }
}

/// Pushes the leaves the store holds beyond the local tree: up to `until` (exclusive), or up to
/// the store's leaf count when `None`.
async fn catch_up(
    store: &dyn Store,
    state: &mut LogState,
    until: Option<u64>,
) -> Result<(), DirectoryError> {
    let target = match until {
        Some(n) => n,
        None => store.leaf_count().await?,
    };
    while state.tree.len() < target {
        let next = state.tree.len();
        let batch = store.leaves(next, REPLAY_BATCH.min(target - next)).await?;
        if batch.is_empty() {
            return Err(DirectoryError::CorruptLeaf {
                index: next,
                reason: format!("the store has fewer than {target} leaves"),
            });
        }
        for bytes in batch {
            let index = state.tree.len();
            let leaf = DirectoryLeaf::decode(&bytes).map_err(|e| DirectoryError::CorruptLeaf {
                index,
                reason: e.to_string(),
            })?;
            state.tree.push(&bytes);
            state.devices.insert(
                (leaf.username, leaf.device_id),
                DeviceEntry {
                    leaf_index: index,
                    version: leaf.version,
                },
            );
        }
    }
    Ok(())
}
