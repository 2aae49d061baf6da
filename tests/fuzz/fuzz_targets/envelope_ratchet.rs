//! Envelopes, directory leaves, ratchet initial headers, and `Session::decrypt` of arbitrary
//! bytes on a fixed established session: no panic, and a refused message changes nothing (the
//! session still decrypts the next genuine message).
#![no_main]

use std::sync::OnceLock;

use chat_core::identity::DeviceKeys;
use chat_core::ratchet::{Session, initial_header};
use chat_core::wire::{DirectoryLeaf, Envelope};
use libfuzzer_sys::fuzz_target;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// Bob's session with Alice after her first message, and Alice's next message to Bob.
fn fixture() -> &'static (Session, Vec<u8>) {
    static FIXTURE: OnceLock<(Session, Vec<u8>)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let mut rng = ChaCha20Rng::from_seed([7; 32]);
        let alice = DeviceKeys::generate(&mut rng);
        let mut bob = DeviceKeys::generate(&mut rng);
        let prekeys = bob.generate_one_time_prekeys(1, &mut rng);
        let bundle = bob.bundle(prekeys.first().map(|k| k.id));
        let mut a = Session::initiate(alice.identity(), &bundle, &mut rng).expect("initiate");
        let first = a.encrypt(b"first", &mut rng).expect("encrypt");
        let (b, _) = Session::accept(&mut bob, &first).expect("accept");
        let next = a.encrypt(b"next", &mut rng).expect("encrypt");
        (b, next)
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = Envelope::decode(data);
    let _ = DirectoryLeaf::decode(data);
    let _ = initial_header(data);
    let (session, next) = fixture();
    let mut s = session.clone();
    if s.decrypt(data).is_err() {
        assert_eq!(
            s.decrypt(next).as_deref(),
            Ok(&b"next"[..]),
            "a refused message changed the session"
        );
    }
});
