//! Accounts: a username and its devices' public keys. The server stores no passwords: a device
//! logs in by signing a one-time challenge with its Ed25519 identity key.
//!
//! The record is encoded with chat-core's codec (`[version 1][count u16][device...]`) and sealed
//! by the store like everything else.

use chat_core::codec::{DecodeError, Reader, Writer};
use chat_core::wire::SignedPrekey;

const RECORD_VERSION: u8 = 1;
/// Most devices per account.
pub const MAX_DEVICES: usize = 16;

/// One registered device's public keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub device_id: u32,
    pub identity_ed25519: [u8; 32],
    pub identity_x25519: [u8; 32],
    pub identity_signature: [u8; 64],
    pub signed_prekey: SignedPrekey,
    pub leaf_index: u64,
}

/// The stored account.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccountRecord {
    pub devices: Vec<DeviceRecord>,
}

impl AccountRecord {
    pub fn device(&self, device_id: u32) -> Option<&DeviceRecord> {
        self.devices.iter().find(|d| d.device_id == device_id)
    }

    /// Adds or replaces a device.
    pub fn upsert(&mut self, device: DeviceRecord) {
        match self
            .devices
            .iter_mut()
            .find(|d| d.device_id == device.device_id)
        {
            Some(existing) => *existing = device,
            None => {
                self.devices.push(device);
                self.devices.sort_by_key(|d| d.device_id);
            }
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(4 + self.devices.len() * 240);
        w.u8(RECORD_VERSION)
            .u16(u16::try_from(self.devices.len()).unwrap_or(u16::MAX));
        for d in self.devices.iter().take(usize::from(u16::MAX)) {
            w.u32(d.device_id)
                .fixed(&d.identity_ed25519)
                .fixed(&d.identity_x25519)
                .fixed(&d.identity_signature)
                .u32(d.signed_prekey.id)
                .fixed(&d.signed_prekey.public)
                .fixed(&d.signed_prekey.signature)
                .u64(d.leaf_index);
        }
        w.into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != RECORD_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "account record",
                version,
            });
        }
        let count = usize::from(r.u16()?);
        if count > MAX_DEVICES {
            return Err(DecodeError::Invalid("too many devices in account record"));
        }
        let mut devices = Vec::with_capacity(count);
        for _ in 0..count {
            devices.push(DeviceRecord {
                device_id: r.u32()?,
                identity_ed25519: r.array()?,
                identity_x25519: r.array()?,
                identity_signature: r.array()?,
                signed_prekey: SignedPrekey {
                    id: r.u32()?,
                    public: r.array()?,
                    signature: r.array()?,
                },
                leaf_index: r.u64()?,
            });
        }
        r.finish()?;
        Ok(Self { devices })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: u32) -> DeviceRecord {
        DeviceRecord {
            device_id: id,
            identity_ed25519: [1; 32],
            identity_x25519: [2; 32],
            identity_signature: [3; 64],
            signed_prekey: SignedPrekey {
                id: 9,
                public: [4; 32],
                signature: [5; 64],
            },
            leaf_index: 42,
        }
    }

    #[test]
    fn record_round_trips_and_upsert_replaces_by_device_id() {
        let mut record = AccountRecord::default();
        record.upsert(device(2));
        record.upsert(device(1));
        let mut changed = device(2);
        changed.leaf_index = 43;
        record.upsert(changed);
        assert_eq!(record.devices.len(), 2);
        assert_eq!(record.device(2).map(|d| d.leaf_index), Some(43));
        assert_eq!(AccountRecord::decode(&record.encode()), Ok(record));
    }

    #[test]
    fn refuses_truncated_records_without_panicking() {
        let mut record = AccountRecord::default();
        record.upsert(device(1));
        let bytes = record.encode();
        for cut in 0..bytes.len() {
            assert!(AccountRecord::decode(&bytes[..cut]).is_err());
        }
    }
}
