//! Merkle proof verification (chat_signing::merkle) with fuzzed proofs, indices, sizes and roots,
//! plus a differential check: proofs made by `MerkleLog` over fuzzed leaves always verify, and
//! a proof with one bit flipped never does. Signed tree heads parse without panicking.
#![no_main]

use chat_signing::merkle::{Hash, MerkleLog, leaf_hash, verify_consistency, verify_inclusion};
use chat_signing::tree_head::SignedTreeHead;
use libfuzzer_sys::fuzz_target;

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, x) in data.iter().skip(at).take(8).enumerate() {
        b[i] = *x;
    }
    u64::from_be_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let _ = SignedTreeHead::from_bytes(data);
    if data.len() < 16 {
        return;
    }
    // Arbitrary inputs to the verifiers.
    let (a, b) = (u64_at(data, 0), u64_at(data, 8));
    let hashes: Vec<Hash> = data[16..]
        .chunks_exact(32)
        .map(|c| c.try_into().unwrap_or([0; 32]))
        .collect();
    let root = hashes.first().copied().unwrap_or([0; 32]);
    let proof = hashes.get(1..).unwrap_or(&[]);
    let _ = verify_inclusion(&leaf_hash(data), a, b, proof, &root);
    let _ = verify_consistency(a % 1 << 40, b % 1 << 40, &root, &root, proof);

    // Differential: a real log over up to 64 leaves from the input.
    let n = (data[0] as u64 % 64) + 1;
    let mut log = MerkleLog::new();
    for i in 0..n {
        log.push(&[data[(i as usize) % data.len()], i as u8]);
    }
    let index = u64::from(data[1]) % n;
    let size = index + 1 + u64::from(data[2]) % (n - index);
    let root = log.root_at(size).expect("root");
    let leaf = log.leaf(index).expect("leaf");
    let mut proof = log.inclusion_proof(index, size).expect("proof");
    assert!(verify_inclusion(&leaf, index, size, &proof, &root).is_ok());
    if let Some(h) = proof.first_mut() {
        h[usize::from(data[3]) % 32] ^= 1 << (data[4] % 8);
        assert!(verify_inclusion(&leaf, index, size, &proof, &root).is_err());
    }
    let old = 1 + u64::from(data[5]) % size;
    let old_root = log.root_at(old).expect("root");
    let mut cproof = log.consistency_proof(old, size).expect("proof");
    assert!(verify_consistency(old, size, &old_root, &root, &cproof).is_ok());
    if let Some(h) = cproof.first_mut() {
        h[usize::from(data[6]) % 32] ^= 1 << (data[7] % 8);
        assert!(verify_consistency(old, size, &old_root, &root, &cproof).is_err());
    }
});
