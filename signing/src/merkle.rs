//! RFC 9162 (Certificate Transparency v2) Merkle tree hashing over SHA-256: an append-only
//! in-memory log that produces roots, inclusion and consistency proofs in O(log n), and the
//! verifiers clients run on those proofs. Every out-of-range argument is a [`MerkleError`].

use sha2::{Digest, Sha256};
use thiserror::Error;

/// A SHA-256 output: a leaf hash, an interior node hash or a tree root.
pub type Hash = [u8; 32];

/// The root of the empty tree: SHA-256 of the empty string (RFC 9162 §2.1.1).
pub const EMPTY_ROOT: Hash = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// Why a log operation or a proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MerkleError {
    #[error("leaf index {index} is outside a tree of {tree_size} leaves")]
    IndexOutOfRange { index: u64, tree_size: u64 },
    #[error("tree size {requested} is larger than the log, which holds {available} leaves")]
    SizeOutOfRange { requested: u64, available: u64 },
    #[error("old tree size {old_size} is larger than new tree size {new_size}")]
    SizesOutOfOrder { old_size: u64, new_size: u64 },
    #[error(
        "a consistency proof from the empty tree proves nothing; old tree size must be at least 1"
    )]
    EmptyOldTree,
    #[error("proof has {actual} hashes where {expected} are required")]
    WrongProofLength { expected: usize, actual: usize },
    #[error("proof does not lead to the expected root hash")]
    RootMismatch,
    #[error("consistency proof does not reproduce the old tree's root hash")]
    OldRootMismatch,
}

/// `SHA-256(0x00 || data)`: the hash of one log entry.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(data);
    h.finalize().into()
}

/// `SHA-256(0x01 || left || right)`: the hash of an interior node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two strictly smaller than `n` (`n >= 2`), the split point `k` of RFC 9162.
fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// An append-only log of leaf hashes.
///
/// `levels[l][i]` is the hash of the complete subtree of `2^l` leaves starting at leaf `i * 2^l`;
/// level 0 holds the leaf hashes. That is about two hashes (64 bytes) per leaf, 64 MiB for a
/// million leaves, and any root or proof is at most ~2·log2(n) lookups and log2(n) hashes.
#[derive(Clone, Default)]
pub struct MerkleLog {
    levels: Vec<Vec<Hash>>,
}

/// Shows the size and root, not the million hashes behind them.
impl std::fmt::Debug for MerkleLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MerkleLog")
            .field("len", &self.len())
            .field("root", &hex::encode(self.root()))
            .finish()
    }
}

impl MerkleLog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an entry (hashed with [`leaf_hash`]) and returns its index.
    pub fn push(&mut self, leaf_data: &[u8]) -> u64 {
        self.push_hash(leaf_hash(leaf_data))
    }

    /// Appends an already computed leaf hash and returns its index.
    pub fn push_hash(&mut self, leaf: Hash) -> u64 {
        let index = self.len();
        let mut carry = leaf;
        let mut level = 0;
        loop {
            if self.levels.len() == level {
                self.levels.push(Vec::new());
            }
            let row = &mut self.levels[level];
            row.push(carry);
            // A row of even length has just completed a subtree one level up.
            if row.len() % 2 != 0 {
                break;
            }
            carry = node_hash(&row[row.len() - 2], &row[row.len() - 1]);
            level += 1;
        }
        index
    }

    /// Number of leaves.
    pub fn len(&self) -> u64 {
        self.levels.first().map_or(0, |leaves| leaves.len() as u64)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The leaf hash at `index`.
    pub fn leaf(&self, index: u64) -> Result<Hash, MerkleError> {
        if index >= self.len() {
            return Err(MerkleError::IndexOutOfRange {
                index,
                tree_size: self.len(),
            });
        }
        Ok(self.complete_subtree(0, index))
    }

    /// The root of the whole log.
    pub fn root(&self) -> Hash {
        self.range_hash(0, self.len())
    }

    /// The root the log had when it held `size` leaves.
    pub fn root_at(&self, size: u64) -> Result<Hash, MerkleError> {
        self.check_size(size)?;
        Ok(self.range_hash(0, size))
    }

    /// The audit path of leaf `index` in the tree of the first `size` leaves (RFC 9162 §2.1.3.1,
    /// `PATH(m, D[n])`), ordered from the leaf's sibling up to the child of the root.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, MerkleError> {
        self.check_size(size)?;
        if index >= size {
            return Err(MerkleError::IndexOutOfRange {
                index,
                tree_size: size,
            });
        }
        // Walk down from the root, collecting the sibling of the subtree holding `index`.
        let (mut lo, mut hi) = (0, size);
        let mut path = Vec::with_capacity(64);
        while hi - lo > 1 {
            let k = split_point(hi - lo);
            if index < lo + k {
                path.push(self.range_hash(lo + k, hi));
                hi = lo + k;
            } else {
                path.push(self.range_hash(lo, lo + k));
                lo += k;
            }
        }
        path.reverse();
        Ok(path)
    }

    /// The proof that the tree of `old_size` leaves is a prefix of the tree of `new_size` leaves
    /// (RFC 9162 §2.1.4.1, `PROOF(m, D[n])`). Empty when the sizes are equal.
    pub fn consistency_proof(
        &self,
        old_size: u64,
        new_size: u64,
    ) -> Result<Vec<Hash>, MerkleError> {
        self.check_size(new_size)?;
        if old_size > new_size {
            return Err(MerkleError::SizesOutOfOrder { old_size, new_size });
        }
        if old_size == 0 {
            return Err(MerkleError::EmptyOldTree);
        }
        // SUBPROOF(m, D[lo..hi], whole), unrolled: each step appends one subtree hash, the
        // recursion bottoms out when the old tree is exactly the current subtree.
        let (mut lo, mut hi, mut whole) = (0, new_size, true);
        let mut proof = Vec::with_capacity(64);
        loop {
            if old_size == hi {
                if !whole {
                    proof.push(self.range_hash(lo, hi));
                }
                break;
            }
            let k = split_point(hi - lo);
            if old_size - lo <= k {
                proof.push(self.range_hash(lo + k, hi));
                hi = lo + k;
            } else {
                proof.push(self.range_hash(lo, lo + k));
                lo += k;
                whole = false;
            }
        }
        proof.reverse();
        Ok(proof)
    }

    fn check_size(&self, size: u64) -> Result<(), MerkleError> {
        if size > self.len() {
            return Err(MerkleError::SizeOutOfRange {
                requested: size,
                available: self.len(),
            });
        }
        Ok(())
    }

    /// The stored hash of the complete subtree at `level`, position `index` (must exist).
    fn complete_subtree(&self, level: u32, index: u64) -> Hash {
        // Callers only ask for subtrees inside the log, whose coordinates fit in usize.
        self.levels[level as usize][index as usize]
    }

    /// `MTH(D[start..end])` for `end <= len` and `start` a multiple of the largest power of two
    /// not above `end - start`: the ranges met by roots and proofs. The range splits into complete
    /// subtrees of decreasing size (the set bits of its width), folded from the right.
    fn range_hash(&self, start: u64, end: u64) -> Hash {
        let mut width = end - start;
        if width == 0 {
            return EMPTY_ROOT;
        }
        let mut right = end;
        let mut acc: Option<Hash> = None;
        while width != 0 {
            let level = width.trailing_zeros();
            right -= 1 << level;
            let subtree = self.complete_subtree(level, right >> level);
            acc = Some(match acc {
                None => subtree,
                Some(r) => node_hash(&subtree, &r),
            });
            width &= width - 1;
        }
        acc.unwrap_or(EMPTY_ROOT)
    }
}

/// Number of hashes in the audit path of leaf `index` in a tree of `size` leaves
/// (`index < size`): the RFC 9162 §2.1.3.2 loop, run without hashing.
fn inclusion_proof_len(index: u64, size: u64) -> usize {
    let (mut fn_, mut sn) = (index, size - 1);
    let mut len = 0;
    while sn != 0 {
        if fn_ & 1 == 0 && fn_ == sn {
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        }
        fn_ >>= 1;
        sn >>= 1;
        len += 1;
    }
    len
}

/// Number of hashes in a consistency proof from `size1` to `size2` (`0 < size1 < size2`): the
/// RFC 9162 §2.1.4.2 loop, run without hashing.
fn consistency_proof_len(size1: u64, size2: u64) -> usize {
    let (mut fn_, mut sn) = (size1 - 1, size2 - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let mut len = 1;
    while sn != 0 {
        if fn_ & 1 == 0 && fn_ == sn {
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        }
        fn_ >>= 1;
        sn >>= 1;
        len += 1;
    }
    if size1.is_power_of_two() {
        len - 1
    } else {
        len
    }
}

/// Checks that `leaf_hash` is the leaf at `index` of the tree of `tree_size` leaves whose root is
/// `root`, given its audit path (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    leaf_hash: &Hash,
    index: u64,
    tree_size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), MerkleError> {
    if index >= tree_size {
        return Err(MerkleError::IndexOutOfRange { index, tree_size });
    }
    let expected = inclusion_proof_len(index, tree_size);
    if proof.len() != expected {
        return Err(MerkleError::WrongProofLength {
            expected,
            actual: proof.len(),
        });
    }
    let (mut fn_, mut sn) = (index, tree_size - 1);
    let mut r = *leaf_hash;
    for p in proof {
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    // The length check above guarantees `sn == 0` here.
    if sn != 0 || r != *root {
        return Err(MerkleError::RootMismatch);
    }
    Ok(())
}

/// Checks that the tree of `size1` leaves with root `root1` is a prefix of the tree of `size2`
/// leaves with root `root2` (RFC 9162 §2.1.4.2). Equal sizes need an empty proof and equal roots;
/// `size1 == 0` is refused, as a proof from the empty tree says nothing.
pub fn verify_consistency(
    size1: u64,
    size2: u64,
    root1: &Hash,
    root2: &Hash,
    proof: &[Hash],
) -> Result<(), MerkleError> {
    if size1 > size2 {
        return Err(MerkleError::SizesOutOfOrder {
            old_size: size1,
            new_size: size2,
        });
    }
    if size1 == 0 {
        return Err(MerkleError::EmptyOldTree);
    }
    if size1 == size2 {
        if !proof.is_empty() {
            return Err(MerkleError::WrongProofLength {
                expected: 0,
                actual: proof.len(),
            });
        }
        if root1 != root2 {
            return Err(MerkleError::RootMismatch);
        }
        return Ok(());
    }
    let expected = consistency_proof_len(size1, size2);
    if proof.len() != expected {
        return Err(MerkleError::WrongProofLength {
            expected,
            actual: proof.len(),
        });
    }
    // When the old tree is a complete subtree its root is the first node of the path, and the
    // proof omits it.
    let (first, rest) = if size1.is_power_of_two() {
        (root1, proof)
    } else {
        match proof.split_first() {
            Some(split) => split,
            None => {
                return Err(MerkleError::WrongProofLength {
                    expected,
                    actual: 0,
                });
            }
        }
    };
    let (mut fn_, mut sn) = (size1 - 1, size2 - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(MerkleError::WrongProofLength {
            expected,
            actual: proof.len(),
        });
    }
    if fr != *root1 {
        return Err(MerkleError::OldRootMismatch);
    }
    if sr != *root2 {
        return Err(MerkleError::RootMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(hex_str: &str) -> Hash {
        let bytes = hex::decode(hex_str).expect("test vector is hex");
        bytes.try_into().expect("test vector is 32 bytes")
    }

    // Known-answer vectors from transparency-dev/merkle (Apache-2.0), commit 417fb0c:
    // testonly/constants.go (leaves, roots) and testdata/{inclusion,consistency}/*/happy-path.json.
    const LEAVES: [&str; 8] = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ];
    const LEAF_HASHES: [&str; 8] = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
        "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
    ];
    /// Roots of the trees of sizes 0..=8.
    const ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];
    /// (leaf index, tree size, audit path).
    const INCLUSION: [(u64, u64, &[&str]); 5] = [
        (0, 1, &[]),
        (
            0,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            5,
            8,
            &[
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            3,
            &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
        ),
        (
            1,
            5,
            &[
                "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
    ];
    /// (old size, new size, proof).
    const CONSISTENCY: [(u64, u64, &[&str]); 5] = [
        (1, 1, &[]),
        (
            1,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            6,
            8,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            5,
            &[
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
        (
            6,
            7,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ];

    fn reference_log() -> MerkleLog {
        let mut log = MerkleLog::new();
        for leaf in LEAVES {
            log.push(&hex::decode(leaf).expect("test vector is hex"));
        }
        log
    }

    fn hashes(list: &[&str]) -> Vec<Hash> {
        list.iter().map(|x| h(x)).collect()
    }

    /// Straight from the RFC 9162 §2.1.1 definition, for cross-checking the indexed log.
    fn naive_root(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => EMPTY_ROOT,
            1 => leaves[0],
            n => {
                let k = split_point(n as u64) as usize;
                node_hash(&naive_root(&leaves[..k]), &naive_root(&leaves[k..]))
            }
        }
    }

    fn sample_log(size: u64) -> MerkleLog {
        let mut log = MerkleLog::new();
        for i in 0..size {
            log.push(&i.to_be_bytes());
        }
        log
    }

    #[test]
    fn empty_root_is_sha256_of_nothing() {
        assert_eq!(EMPTY_ROOT, <[u8; 32]>::from(Sha256::digest(b"")));
        assert_eq!(MerkleLog::new().root(), EMPTY_ROOT);
    }

    #[test]
    fn leaf_hashes_match_published_vectors() {
        let log = reference_log();
        for (i, want) in LEAF_HASHES.iter().enumerate() {
            assert_eq!(log.leaf(i as u64), Ok(h(want)), "leaf {i}");
        }
    }

    #[test]
    fn roots_match_published_vectors_for_every_size() {
        let log = reference_log();
        for (size, want) in ROOTS.iter().enumerate() {
            assert_eq!(log.root_at(size as u64), Ok(h(want)), "size {size}");
        }
        assert_eq!(log.root(), h(ROOTS[8]));
    }

    #[test]
    fn inclusion_proofs_match_published_vectors() {
        let log = reference_log();
        for (index, size, path) in INCLUSION {
            let proof = log.inclusion_proof(index, size).expect("in range");
            assert_eq!(proof, hashes(path), "leaf {index} in tree {size}");
            let leaf = h(LEAF_HASHES[index as usize]);
            let root = h(ROOTS[size as usize]);
            assert_eq!(verify_inclusion(&leaf, index, size, &proof, &root), Ok(()));
        }
    }

    #[test]
    fn consistency_proofs_match_published_vectors() {
        let log = reference_log();
        for (old, new, path) in CONSISTENCY {
            let proof = log.consistency_proof(old, new).expect("in range");
            assert_eq!(proof, hashes(path), "from {old} to {new}");
            let (r1, r2) = (h(ROOTS[old as usize]), h(ROOTS[new as usize]));
            assert_eq!(verify_consistency(old, new, &r1, &r2, &proof), Ok(()));
        }
    }

    #[test]
    fn single_leaf_tree_root_is_its_leaf_hash() {
        // transparency-dev/merkle testdata/inclusion/single-entry/matching-root-and-leaf.json
        let leaf = h("0d3aed023148ffd2a259fbd0cdc7fb3cf975658760d3775b82af6f90aacc2dfc");
        assert_eq!(verify_inclusion(&leaf, 0, 1, &[], &leaf), Ok(()));
        assert_eq!(
            verify_inclusion(&leaf, 0, 1, &[], &EMPTY_ROOT),
            Err(MerkleError::RootMismatch)
        );
    }

    #[test]
    fn refuses_inclusion_in_the_empty_tree() {
        assert_eq!(
            verify_inclusion(&EMPTY_ROOT, 0, 0, &[], &EMPTY_ROOT),
            Err(MerkleError::IndexOutOfRange {
                index: 0,
                tree_size: 0
            })
        );
    }

    #[test]
    fn refuses_inclusion_proof_with_a_hash_added_or_removed() {
        let log = reference_log();
        let (leaf, root) = (h(LEAF_HASHES[5]), h(ROOTS[8]));
        let mut proof = log.inclusion_proof(5, 8).expect("in range");
        proof.push(EMPTY_ROOT);
        assert_eq!(
            verify_inclusion(&leaf, 5, 8, &proof, &root),
            Err(MerkleError::WrongProofLength {
                expected: 3,
                actual: 4
            })
        );
        proof.truncate(2);
        assert_eq!(
            verify_inclusion(&leaf, 5, 8, &proof, &root),
            Err(MerkleError::WrongProofLength {
                expected: 3,
                actual: 2
            })
        );
    }

    #[test]
    fn refuses_consistency_from_the_empty_tree_or_backwards() {
        // Edge cases of transparency-dev/merkle testdata/consistency/additional/.
        let log = reference_log();
        assert_eq!(log.consistency_proof(0, 3), Err(MerkleError::EmptyOldTree));
        assert_eq!(
            verify_consistency(0, 1, &EMPTY_ROOT, &EMPTY_ROOT, &[EMPTY_ROOT]),
            Err(MerkleError::EmptyOldTree)
        );
        assert_eq!(
            verify_consistency(0, 0, &EMPTY_ROOT, &EMPTY_ROOT, &[]),
            Err(MerkleError::EmptyOldTree)
        );
        assert_eq!(
            log.consistency_proof(4, 3),
            Err(MerkleError::SizesOutOfOrder {
                old_size: 4,
                new_size: 3
            })
        );
        assert_eq!(
            verify_consistency(2, 1, &EMPTY_ROOT, &EMPTY_ROOT, &[]),
            Err(MerkleError::SizesOutOfOrder {
                old_size: 2,
                new_size: 1
            })
        );
    }

    #[test]
    fn refuses_equal_sizes_with_different_roots_or_a_proof() {
        let (r1, r2) = (h(ROOTS[1]), h(ROOTS[2]));
        assert_eq!(
            verify_consistency(1, 1, &r1, &r2, &[]),
            Err(MerkleError::RootMismatch)
        );
        assert_eq!(
            verify_consistency(1, 1, &r1, &r1, &[r1]),
            Err(MerkleError::WrongProofLength {
                expected: 0,
                actual: 1
            })
        );
        assert_eq!(
            verify_consistency(1, 2, &r1, &r2, &[]),
            Err(MerkleError::WrongProofLength {
                expected: 1,
                actual: 0
            })
        );
    }

    #[test]
    fn refuses_swapped_roots() {
        let log = reference_log();
        let proof = log.consistency_proof(6, 8).expect("in range");
        let (r6, r8) = (h(ROOTS[6]), h(ROOTS[8]));
        assert!(verify_consistency(6, 8, &r8, &r6, &proof).is_err());
    }

    #[test]
    fn refuses_out_of_range_requests_to_the_log() {
        let log = reference_log();
        let beyond = MerkleError::SizeOutOfRange {
            requested: 9,
            available: 8,
        };
        assert_eq!(log.root_at(9), Err(beyond.clone()));
        assert_eq!(log.inclusion_proof(0, 9), Err(beyond.clone()));
        assert_eq!(log.consistency_proof(1, 9), Err(beyond));
        assert_eq!(
            log.inclusion_proof(8, 8),
            Err(MerkleError::IndexOutOfRange {
                index: 8,
                tree_size: 8
            })
        );
        assert_eq!(
            log.leaf(8),
            Err(MerkleError::IndexOutOfRange {
                index: 8,
                tree_size: 8
            })
        );
        assert_eq!(
            log.inclusion_proof(0, 0),
            Err(MerkleError::IndexOutOfRange {
                index: 0,
                tree_size: 0
            })
        );
    }

    #[test]
    fn verifiers_never_panic_at_extreme_sizes() {
        let x = [7u8; 32];
        let long = vec![x; 70];
        for size in [1, 2, u64::MAX / 2, u64::MAX - 1, u64::MAX] {
            for index in [0, size / 2, size - 1] {
                for proof in [&[][..], &long[..1], &long[..64], &long[..]] {
                    let _ = verify_inclusion(&x, index, size, proof, &x);
                }
            }
            for size1 in [1, size / 3 + 1, size - 1, size] {
                for proof in [&[][..], &long[..1], &long[..64], &long[..]] {
                    let _ = verify_consistency(size1, size, &x, &x, proof);
                }
            }
        }
    }

    #[test]
    fn log_roots_match_the_recursive_definition() {
        let mut log = MerkleLog::new();
        let mut leaves = Vec::new();
        for i in 0u64..70 {
            assert_eq!(log.root(), naive_root(&leaves));
            leaves.push(leaf_hash(&i.to_le_bytes()));
            assert_eq!(log.push(&i.to_le_bytes()), i);
        }
        for size in 0..=70 {
            assert_eq!(log.root_at(size), Ok(naive_root(&leaves[..size as usize])));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn every_inclusion_proof_verifies_and_no_tampering_does(
            size in 1u64..300,
            index_seed in any::<u64>(),
            byte_seed in any::<usize>(),
            bit in 0u8..8,
        ) {
            let log = sample_log(size + 7);
            let root = log.root_at(size).expect("in range");
            for index in 0..size {
                let leaf = log.leaf(index).expect("in range");
                let proof = log.inclusion_proof(index, size).expect("in range");
                prop_assert_eq!(verify_inclusion(&leaf, index, size, &proof, &root), Ok(()));
            }
            let index = index_seed % size;
            let leaf = log.leaf(index).expect("in range");
            let proof = log.inclusion_proof(index, size).expect("in range");
            let flip = 1u8 << bit;
            // Any flipped bit in the proof, the leaf or the root is refused.
            if !proof.is_empty() {
                let mut bad = proof.clone();
                let at = byte_seed % (bad.len() * 32);
                bad[at / 32][at % 32] ^= flip;
                prop_assert!(verify_inclusion(&leaf, index, size, &bad, &root).is_err());
            }
            let mut bad_root = root;
            bad_root[byte_seed % 32] ^= flip;
            prop_assert!(verify_inclusion(&leaf, index, size, &proof, &bad_root).is_err());
            let mut bad_leaf = leaf;
            bad_leaf[byte_seed % 32] ^= flip;
            prop_assert!(verify_inclusion(&bad_leaf, index, size, &proof, &root).is_err());
            // The same proof does not prove another index, nor inclusion in the tree of another
            // size. (A wrong size next to the right root can only pass where both sizes give the
            // path the same shape; signed tree heads bind the size to the root, so it never is.)
            for other in [index ^ 1, index + 1, index.wrapping_sub(1)] {
                if other != index {
                    prop_assert!(verify_inclusion(&leaf, other, size, &proof, &root).is_err());
                }
            }
            for other in [size + 1, size - 1, size + 7, size / 2] {
                if other != size && other > index {
                    let other_root = log.root_at(other).expect("in range");
                    prop_assert!(verify_inclusion(&leaf, index, other, &proof, &other_root).is_err());
                }
            }
        }

        #[test]
        fn every_consistency_proof_verifies_and_no_tampering_does(
            size2 in 1u64..300,
            size1_seed in any::<u64>(),
            byte_seed in any::<usize>(),
            bit in 0u8..8,
        ) {
            let log = sample_log(size2 + 7);
            let root2 = log.root_at(size2).expect("in range");
            for size1 in 1..=size2 {
                let root1 = log.root_at(size1).expect("in range");
                let proof = log.consistency_proof(size1, size2).expect("in range");
                prop_assert_eq!(verify_consistency(size1, size2, &root1, &root2, &proof), Ok(()));
            }
            let size1 = size1_seed % size2 + 1;
            let root1 = log.root_at(size1).expect("in range");
            let proof = log.consistency_proof(size1, size2).expect("in range");
            let flip = 1u8 << bit;
            if !proof.is_empty() {
                let mut bad = proof.clone();
                let at = byte_seed % (bad.len() * 32);
                bad[at / 32][at % 32] ^= flip;
                prop_assert!(verify_consistency(size1, size2, &root1, &root2, &bad).is_err());
            }
            let mut bad_root1 = root1;
            bad_root1[byte_seed % 32] ^= flip;
            prop_assert!(verify_consistency(size1, size2, &bad_root1, &root2, &proof).is_err());
            let mut bad_root2 = root2;
            bad_root2[byte_seed % 32] ^= flip;
            prop_assert!(verify_consistency(size1, size2, &root1, &bad_root2, &proof).is_err());
            // The same proof does not relate the trees of other sizes of the same log.
            for (s1, s2) in [
                (size1 + 1, size2),
                (size1 - 1, size2),
                (size1, size2 + 1),
                (size1, size2 - 1),
                (size1, size2 + 7),
            ] {
                if (s1, s2) != (size1, size2) && 0 < s1 && s1 <= s2 {
                    let r1 = log.root_at(s1).expect("in range");
                    let r2 = log.root_at(s2).expect("in range");
                    prop_assert!(verify_consistency(s1, s2, &r1, &r2, &proof).is_err());
                }
            }
        }
    }
}
