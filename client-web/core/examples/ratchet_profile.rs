//! A fixed workload for instruction-count profiles of the symmetric ratchet and the sender-key
//! group message (the criterion bench's operations, without criterion):
//!
//! ```text
//! cargo build --release -p chat-core --example ratchet_profile
//! valgrind --tool=callgrind --toggle-collect='*ratchet_profile::run_*' \
//!     target/release/examples/ratchet_profile ratchet 1000
//! ```
//!
//! `ratchet N` runs N encrypt + decrypt of a 256-byte message, `group N` N group messages.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use chat_core::group::GroupState;
use chat_core::identity::{DeviceKeys, IdentityKeyPair};
use chat_core::ratchet::Session;
use rand_core::OsRng;

#[inline(never)]
fn run_ratchet(a: &mut Session, b: &mut Session, n: usize) {
    let plaintext = [0x5a_u8; 256];
    for _ in 0..n {
        let m = a.encrypt(black_box(&plaintext), &mut OsRng).unwrap();
        black_box(b.decrypt(&m).unwrap());
    }
}

#[inline(never)]
fn run_group(a: &mut GroupState, b: &mut GroupState, n: usize) {
    let plaintext = [0x5a_u8; 256];
    for _ in 0..n {
        let m = a.encrypt(black_box(&plaintext)).unwrap();
        black_box(b.decrypt(&m).unwrap());
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let what = args.next().unwrap_or_else(|| "ratchet".into());
    let n: usize = args.next().map(|s| s.parse().unwrap()).unwrap_or(1000);
    match what.as_str() {
        "ratchet" => {
            let alice = IdentityKeyPair::generate(&mut OsRng);
            let mut bob_keys = DeviceKeys::generate(&mut OsRng);
            let mut a = Session::initiate(&alice, &bob_keys.bundle(None), &mut OsRng).unwrap();
            let (mut b, _) =
                Session::accept(&mut bob_keys, &a.encrypt(b"hi", &mut OsRng).unwrap()).unwrap();
            a.decrypt(&b.encrypt(b"hello", &mut OsRng).unwrap())
                .unwrap();
            run_ratchet(&mut a, &mut b, n);
        }
        "group" => {
            let mut a = GroupState::new(b"bench", "alice", ["bob"], &mut OsRng).unwrap();
            let mut b = GroupState::new(b"bench", "bob", ["alice"], &mut OsRng).unwrap();
            b.process_distribution("alice", &a.own_distribution())
                .unwrap();
            run_group(&mut a, &mut b, n);
        }
        other => panic!("unknown workload {other}: ratchet or group"),
    }
}
