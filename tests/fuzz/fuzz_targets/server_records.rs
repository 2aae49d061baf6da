//! What the server decodes from bytes a peer shaped (there are no JSON bodies): account records,
//! mailbox records, directory leaves, the client's persisted directory state, data-key files,
//! and `seal::open` of arbitrary stored records under a fixed key ring. Never panics; nothing
//! forged opens.
#![no_main]

use std::sync::OnceLock;

use chat_core::directory::DirectoryVerifier;
use chat_core::wire::DirectoryLeaf;
use chat_server::accounts::AccountRecord;
use chat_server::node::MailboxRecord;
use chat_server::store::DataKeyRing;
use chat_server::store::seal::{Slot, Table};
use libfuzzer_sys::fuzz_target;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

fn ring() -> &'static DataKeyRing {
    static RING: OnceLock<DataKeyRing> = OnceLock::new();
    RING.get_or_init(|| DataKeyRing::generate(&mut ChaCha20Rng::from_seed([3; 32])))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = AccountRecord::decode(data) {
        let _ = record.encode();
    }
    if let Ok(record) = MailboxRecord::decode(data) {
        assert_eq!(record.encode(), data, "mailbox record is not canonical");
    }
    let _ = DirectoryLeaf::decode(data);
    let _ = DirectoryVerifier::from_bytes(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = DataKeyRing::from_file_string(text);
    }
    let slot = Slot::new().str("alice").u32(1).u64(7);
    for table in [Table::Accounts, Table::MailboxMessages, Table::Leaves] {
        assert!(
            ring().open(table, &slot, data).is_err(),
            "a forged record opened"
        );
    }
});
