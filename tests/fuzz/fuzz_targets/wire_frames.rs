//! Client and server frame decoding (chat_core::wire): never panics, and whatever decodes
//! re-encodes to the identical bytes (the encoding is canonical).
#![no_main]

use chat_core::wire::{ClientFrame, ServerFrame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = ClientFrame::decode(data) {
        assert_eq!(frame.encode(), data, "client frame is not canonical");
    }
    if let Ok(frame) = ServerFrame::decode(data) {
        assert_eq!(frame.encode(), data, "server frame is not canonical");
    }
});
