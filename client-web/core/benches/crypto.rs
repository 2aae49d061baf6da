//! Criterion benchmarks of chat-core's protocol hot paths: one X25519 agreement, X3DH on both
//! sides, a symmetric-ratchet encrypt+decrypt of 256 bytes, and a sender-key group message.
#![allow(clippy::unwrap_used)]

use chat_core::group::GroupState;
use chat_core::identity::{DeviceKeys, IdentityKeyPair};
use chat_core::ratchet::Session;
use chat_core::x3dh;
use criterion::{Criterion, black_box, criterion_group, criterion_main};
use rand_core::OsRng;
use x25519_dalek::{PublicKey, StaticSecret};

fn x25519_dh(c: &mut Criterion) {
    let a = StaticSecret::random_from_rng(OsRng);
    let b = PublicKey::from(&StaticSecret::random_from_rng(OsRng));
    c.bench_function("x25519_dh", |bench| {
        bench.iter(|| black_box(a.diffie_hellman(black_box(&b))).was_contributory())
    });
}

fn x3dh_both_sides(c: &mut Criterion) {
    let alice = IdentityKeyPair::generate(&mut OsRng);
    let bob = DeviceKeys::generate(&mut OsRng);
    let bundle = bob.bundle(None);
    c.bench_function("x3dh_initiator_and_responder", |bench| {
        bench.iter(|| {
            // Without a one-time prekey so that the responder's key store is not consumed.
            let a = x3dh::initiate(&alice, black_box(&bundle), &mut OsRng).unwrap();
            let mut keys = bob.clone();
            let b = x3dh::respond(&mut keys, &a.header).unwrap();
            assert_eq!(*a.shared_secret, *b.shared_secret);
        })
    });
}

fn ratchet_symmetric(c: &mut Criterion) {
    let alice = IdentityKeyPair::generate(&mut OsRng);
    let mut bob_keys = DeviceKeys::generate(&mut OsRng);
    let mut a = Session::initiate(&alice, &bob_keys.bundle(None), &mut OsRng).unwrap();
    let (mut b, _) =
        Session::accept(&mut bob_keys, &a.encrypt(b"hi", &mut OsRng).unwrap()).unwrap();
    // One round trip so that Alice sends ordinary (non-initial) messages.
    a.decrypt(&b.encrypt(b"hello", &mut OsRng).unwrap())
        .unwrap();
    let plaintext = [0x5a_u8; 256];
    c.bench_function("ratchet_encrypt_decrypt_256B", |bench| {
        bench.iter(|| {
            let m = a.encrypt(black_box(&plaintext), &mut OsRng).unwrap();
            black_box(b.decrypt(&m).unwrap())
        })
    });
}

fn group_message(c: &mut Criterion) {
    let mut a = GroupState::new(b"bench", "alice", ["bob"], &mut OsRng).unwrap();
    let mut b = GroupState::new(b"bench", "bob", ["alice"], &mut OsRng).unwrap();
    b.process_distribution("alice", &a.own_distribution())
        .unwrap();
    let plaintext = [0x5a_u8; 256];
    c.bench_function("group_encrypt_decrypt_256B", |bench| {
        bench.iter(|| {
            let m = a.encrypt(black_box(&plaintext)).unwrap();
            black_box(b.decrypt(&m).unwrap())
        })
    });
}

criterion_group!(
    benches,
    x25519_dh,
    x3dh_both_sides,
    ratchet_symmetric,
    group_message
);
criterion_main!(benches);
