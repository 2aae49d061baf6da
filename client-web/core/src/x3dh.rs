//! Signal's X3DH key agreement (<https://signal.org/docs/specifications/x3dh/>) over X25519.
//!
//! DH1 = DH(IK_A, SPK_B), DH2 = DH(EK_A, IK_B), DH3 = DH(EK_A, SPK_B), DH4 = DH(EK_A, OPK_B) when
//! a one-time prekey was used; SK = HKDF-SHA256(salt = 32 zero bytes, ikm = 32×0xFF || DH1..DH4,
//! info = "ChatApp_X3DH_v1"); AD = Encode(IK_A) || Encode(IK_B), where Encode is
//! `Ed25519 || X25519` of the identity. Every X25519 output must be contributory (a low-order
//! peer key gives [`X3dhError::NonContributory`] naming the DH that failed).

use hkdf::Hkdf;
use rand_core::CryptoRngCore;
use sha2::Sha256;
use thiserror::Error;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::codec::{DecodeError, Reader, Writer};
use crate::identity::{DeviceKeys, IdentityKeyPair, IdentityPublic, KeyError, PreKeyBundle};

const X3DH_INFO: &[u8] = b"ChatApp_X3DH_v1";

/// Which of the four X3DH Diffie-Hellman computations a failure refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhStep {
    /// DH(IK_A, SPK_B)
    Dh1,
    /// DH(EK_A, IK_B)
    Dh2,
    /// DH(EK_A, SPK_B)
    Dh3,
    /// DH(EK_A, OPK_B)
    Dh4,
}

/// Why an X3DH agreement failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum X3dhError {
    #[error("prekey bundle or sender identity refused: {0}")]
    Key(#[from] KeyError),
    #[error("X25519 output of {step:?} is not contributory (low-order peer key)")]
    NonContributory { step: DhStep },
    #[error("the initial message names signed prekey {0}, which this device does not have")]
    UnknownSignedPreKey(u32),
    #[error(
        "the initial message names one-time prekey {0}, which is unknown or already used \
         (a replayed initial message?)"
    )]
    UnknownOneTimePreKey(u32),
}

/// The X3DH part of an initial message: who is starting the session and with which keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitialHeader {
    pub sender: IdentityPublic,
    pub ephemeral_key: PublicKey,
    pub signed_prekey_id: u32,
    pub one_time_prekey_id: Option<u32>,
}

impl InitialHeader {
    pub(crate) fn write(&self, w: &mut Writer) {
        self.sender.write(w);
        w.fixed(self.ephemeral_key.as_bytes())
            .u32(self.signed_prekey_id);
        match self.one_time_prekey_id {
            Some(id) => w.u8(1).u32(id),
            None => w.u8(0),
        };
    }

    /// Steps over an initial header, checking its layout but not its keys, and returns its
    /// bytes for [`InitialHeader::decode`]. A session already running ignores the header (it
    /// only starts one), and decoding its Ed25519 key was the largest cost of decrypting a
    /// message that carries it: close to half of `Session::decrypt`.
    pub(crate) fn skip<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], DecodeError> {
        let start = r.offset();
        IdentityPublic::skip(r)?;
        r.skip(32)?;
        r.u32()?;
        if r.bool()? {
            r.u32()?;
        }
        Ok(r.since(start))
    }

    /// Decodes a header [`InitialHeader::skip`] stepped over.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let header = Self::read(&mut r)?;
        r.finish()?;
        Ok(header)
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            sender: IdentityPublic::read(r)?,
            ephemeral_key: PublicKey::from(r.array::<32>()?),
            signed_prekey_id: r.u32()?,
            one_time_prekey_id: if r.bool()? { Some(r.u32()?) } else { None },
        })
    }
}

/// The result of X3DH on either side.
pub struct X3dhAgreement {
    /// SK: the 32-byte shared secret that seeds the Double Ratchet.
    pub shared_secret: Zeroizing<[u8; 32]>,
    /// AD = Encode(IK_A) || Encode(IK_B).
    pub associated_data: Vec<u8>,
    /// The header to send (initiator) or that was received (responder).
    pub header: InitialHeader,
}

impl std::fmt::Debug for X3dhAgreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X3dhAgreement")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

/// Diffie-Hellman that refuses a non-contributory (all-zero) output.
pub(crate) fn contributory_dh(
    secret: &StaticSecret,
    public: &PublicKey,
) -> Option<Zeroizing<[u8; 32]>> {
    let shared = secret.diffie_hellman(public);
    shared
        .was_contributory()
        .then(|| Zeroizing::new(shared.to_bytes()))
}

fn dh(
    secret: &StaticSecret,
    public: &PublicKey,
    step: DhStep,
) -> Result<Zeroizing<[u8; 32]>, X3dhError> {
    contributory_dh(secret, public).ok_or(X3dhError::NonContributory { step })
}

fn kdf(dhs: &[Zeroizing<[u8; 32]>]) -> Zeroizing<[u8; 32]> {
    let mut ikm = Zeroizing::new(Vec::with_capacity(32 * 5));
    ikm.extend_from_slice(&[0xFF; 32]);
    for d in dhs {
        ikm.extend_from_slice(d.as_ref());
    }
    let mut out = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(Some(&[0u8; 32]), &ikm)
        .expand(X3DH_INFO, out.as_mut())
        .unwrap_or_else(|_| unreachable!("32 bytes is a valid HKDF-SHA256 output length"));
    out
}

fn associated_data(initiator: &IdentityPublic, responder: &IdentityPublic) -> Vec<u8> {
    [initiator.key_bytes(), responder.key_bytes()].concat()
}

/// Initiator side: verifies `bundle`, then agrees on SK with its owner.
pub fn initiate(
    identity: &IdentityKeyPair,
    bundle: &PreKeyBundle,
    rng: &mut impl CryptoRngCore,
) -> Result<X3dhAgreement, X3dhError> {
    bundle.verify()?;
    let ephemeral = StaticSecret::random_from_rng(&mut *rng);
    let spk = &bundle.signed_prekey.key;
    let mut dhs = vec![
        dh(identity.dh_secret(), spk, DhStep::Dh1)?,
        dh(&ephemeral, bundle.identity.dh_key(), DhStep::Dh2)?,
        dh(&ephemeral, spk, DhStep::Dh3)?,
    ];
    if let Some(otk) = &bundle.one_time_prekey {
        dhs.push(dh(&ephemeral, &otk.key, DhStep::Dh4)?);
    }
    Ok(X3dhAgreement {
        shared_secret: kdf(&dhs),
        associated_data: associated_data(identity.public(), &bundle.identity),
        header: InitialHeader {
            sender: *identity.public(),
            ephemeral_key: PublicKey::from(&ephemeral),
            signed_prekey_id: bundle.signed_prekey.id,
            one_time_prekey_id: bundle.one_time_prekey.map(|k| k.id),
        },
    })
}

/// Responder side: agrees on SK from a received header and consumes the one-time prekey it
/// names. (`Session::accept` consumes it only once the first message also decrypts.)
pub fn respond(keys: &mut DeviceKeys, header: &InitialHeader) -> Result<X3dhAgreement, X3dhError> {
    let agreement = respond_without_consuming(keys, header)?;
    if let Some(id) = header.one_time_prekey_id {
        keys.consume_one_time_prekey(id);
    }
    Ok(agreement)
}

pub(crate) fn respond_without_consuming(
    keys: &DeviceKeys,
    header: &InitialHeader,
) -> Result<X3dhAgreement, X3dhError> {
    header.sender.verify()?;
    let spk = keys
        .signed_prekey_secret(header.signed_prekey_id)
        .ok_or(X3dhError::UnknownSignedPreKey(header.signed_prekey_id))?;
    let identity = keys.identity();
    let mut dhs = vec![
        dh(spk.secret(), header.sender.dh_key(), DhStep::Dh1)?,
        dh(identity.dh_secret(), &header.ephemeral_key, DhStep::Dh2)?,
        dh(spk.secret(), &header.ephemeral_key, DhStep::Dh3)?,
    ];
    if let Some(id) = header.one_time_prekey_id {
        let otk = keys
            .one_time_prekey_secret(id)
            .ok_or(X3dhError::UnknownOneTimePreKey(id))?;
        dhs.push(dh(otk.secret(), &header.ephemeral_key, DhStep::Dh4)?);
    }
    Ok(X3dhAgreement {
        shared_secret: kdf(&dhs),
        associated_data: associated_data(&header.sender, identity.public()),
        header: *header,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::identity::{OneTimePreKey, SignedPreKey};
    use ed25519_dalek::{Signer, SigningKey};
    use rand_core::OsRng;

    /// A low-order point: X25519 with it yields all zeros after clamping.
    const LOW_ORDER: [u8; 32] = [0; 32];

    #[test]
    fn both_sides_agree_with_a_one_time_prekey() {
        let alice = IdentityKeyPair::generate(&mut OsRng);
        let mut bob = DeviceKeys::generate(&mut OsRng);
        let otk = bob.generate_one_time_prekeys(1, &mut OsRng)[0];
        let a = initiate(&alice, &bob.bundle(Some(otk.id)), &mut OsRng).unwrap();
        let b = respond(&mut bob, &a.header).unwrap();
        assert_eq!(*a.shared_secret, *b.shared_secret);
        assert_eq!(a.associated_data, b.associated_data);
        assert_eq!(a.associated_data.len(), 128);
    }

    #[test]
    fn both_sides_agree_without_a_one_time_prekey() {
        let alice = IdentityKeyPair::generate(&mut OsRng);
        let mut bob = DeviceKeys::generate(&mut OsRng);
        let a = initiate(&alice, &bob.bundle(None), &mut OsRng).unwrap();
        let b = respond(&mut bob, &a.header).unwrap();
        assert_eq!(*a.shared_secret, *b.shared_secret);
    }

    #[test]
    fn skipping_a_header_steps_over_exactly_what_reading_it_consumes() {
        let alice = IdentityKeyPair::generate(&mut OsRng);
        let mut bob = DeviceKeys::generate(&mut OsRng);
        let otk = bob.generate_one_time_prekeys(1, &mut OsRng)[0];
        for bundle in [bob.bundle(None), bob.bundle(Some(otk.id))] {
            let header = initiate(&alice, &bundle, &mut OsRng).unwrap().header;
            let mut w = Writer::new();
            header.write(&mut w);
            w.u8(0xAA); // what follows the header in a message
            let bytes = w.into_bytes();
            let mut r = Reader::new(&bytes);
            let skipped = InitialHeader::skip(&mut r).unwrap();
            assert_eq!(skipped.len(), bytes.len() - 1);
            assert_eq!(r.u8().unwrap(), 0xAA);
            assert_eq!(InitialHeader::decode(skipped).unwrap(), header);
            // A cut header, another identity-key version or a bad flag is refused by both.
            for bad in [
                bytes[..bytes.len() - 2].to_vec(),
                [&[2u8][..], &bytes[1..]].concat(),
                {
                    let mut b = bytes.clone();
                    b[IdentityPublic::ENCODED_LEN + 32 + 4] = 7;
                    b
                },
            ] {
                assert!(InitialHeader::skip(&mut Reader::new(&bad[..bad.len() - 1])).is_err());
                assert!(InitialHeader::decode(&bad[..bad.len() - 1]).is_err());
            }
        }
    }

    #[test]
    fn responder_consumes_the_one_time_prekey() {
        let alice = IdentityKeyPair::generate(&mut OsRng);
        let mut bob = DeviceKeys::generate(&mut OsRng);
        let otk = bob.generate_one_time_prekeys(1, &mut OsRng)[0];
        let a = initiate(&alice, &bob.bundle(Some(otk.id)), &mut OsRng).unwrap();
        respond(&mut bob, &a.header).unwrap();
        assert_eq!(bob.one_time_prekeys().count(), 0);
        assert_eq!(
            respond(&mut bob, &a.header).err(),
            Some(X3dhError::UnknownOneTimePreKey(otk.id))
        );
    }

    #[test]
    fn refuses_a_bundle_with_a_bad_signature() {
        let alice = IdentityKeyPair::generate(&mut OsRng);
        let bob = DeviceKeys::generate(&mut OsRng);
        let mut bundle = bob.bundle(None);
        bundle.signed_prekey.id += 1;
        assert!(matches!(
            initiate(&alice, &bundle, &mut OsRng),
            Err(X3dhError::Key(KeyError::BadSignedPreKeySignature { .. }))
        ));
    }

    /// A bundle whose owner (a malicious peer) validly signs low-order keys.
    fn malicious_bundle(low_identity: bool, low_spk: bool, low_otk: bool) -> PreKeyBundle {
        let signing = SigningKey::generate(&mut OsRng);
        let honest = || PublicKey::from(&StaticSecret::random_from_rng(OsRng));
        let pick = |low: bool| {
            if low {
                PublicKey::from(LOW_ORDER)
            } else {
                honest()
            }
        };
        let dh_key = pick(low_identity);
        let identity_bytes = {
            let mut w = Writer::new();
            w.u8(1)
                .fixed(signing.verifying_key().as_bytes())
                .fixed(dh_key.as_bytes())
                .fixed(
                    &signing
                        .sign(&[b"ChatApp_IdentityDH_v1".as_slice(), dh_key.as_bytes()].concat())
                        .to_bytes(),
                );
            w.into_bytes()
        };
        let identity = IdentityPublic::decode(&identity_bytes).unwrap();
        let spk_key = pick(low_spk);
        let msg = [
            b"ChatApp_SignedPreKey_v1".as_slice(),
            &7u32.to_be_bytes(),
            spk_key.as_bytes(),
        ]
        .concat();
        PreKeyBundle {
            identity,
            signed_prekey: SignedPreKey {
                id: 7,
                key: spk_key,
                signature: signing.sign(&msg),
            },
            one_time_prekey: Some(OneTimePreKey {
                id: 1,
                key: pick(low_otk),
            }),
        }
    }

    fn initiate_err(bundle: &PreKeyBundle) -> Option<X3dhError> {
        let alice = IdentityKeyPair::generate(&mut OsRng);
        initiate(&alice, bundle, &mut OsRng).err()
    }

    #[test]
    fn initiator_refuses_low_order_signed_prekey_in_dh1() {
        assert_eq!(
            initiate_err(&malicious_bundle(false, true, false)),
            Some(X3dhError::NonContributory { step: DhStep::Dh1 })
        );
    }

    #[test]
    fn initiator_refuses_low_order_identity_key_in_dh2() {
        assert_eq!(
            initiate_err(&malicious_bundle(true, false, false)),
            Some(X3dhError::NonContributory { step: DhStep::Dh2 })
        );
    }

    #[test]
    fn initiator_refuses_low_order_one_time_prekey_in_dh4() {
        assert_eq!(
            initiate_err(&malicious_bundle(false, false, true)),
            Some(X3dhError::NonContributory { step: DhStep::Dh4 })
        );
    }

    #[test]
    fn initiator_accepts_a_bundle_of_honest_keys() {
        assert_eq!(initiate_err(&malicious_bundle(false, false, false)), None);
    }

    #[test]
    fn responder_refuses_low_order_ephemeral_key() {
        let alice = IdentityKeyPair::generate(&mut OsRng);
        let mut bob = DeviceKeys::generate(&mut OsRng);
        let mut header = initiate(&alice, &bob.bundle(None), &mut OsRng)
            .unwrap()
            .header;
        header.ephemeral_key = PublicKey::from(LOW_ORDER);
        assert_eq!(
            respond(&mut bob, &header).err(),
            Some(X3dhError::NonContributory { step: DhStep::Dh2 })
        );
    }

    #[test]
    fn responder_refuses_low_order_sender_identity_in_dh1() {
        let mut bob = DeviceKeys::generate(&mut OsRng);
        let evil = malicious_bundle(true, false, false).identity;
        let header = InitialHeader {
            sender: evil,
            ephemeral_key: PublicKey::from(&StaticSecret::random_from_rng(OsRng)),
            signed_prekey_id: 1,
            one_time_prekey_id: None,
        };
        assert_eq!(
            respond(&mut bob, &header).err(),
            Some(X3dhError::NonContributory { step: DhStep::Dh1 })
        );
    }

    #[test]
    fn responder_refuses_unknown_signed_prekey() {
        let alice = IdentityKeyPair::generate(&mut OsRng);
        let mut bob = DeviceKeys::generate(&mut OsRng);
        let mut header = initiate(&alice, &bob.bundle(None), &mut OsRng)
            .unwrap()
            .header;
        header.signed_prekey_id = 99;
        assert_eq!(
            respond(&mut bob, &header).err(),
            Some(X3dhError::UnknownSignedPreKey(99))
        );
    }

    #[test]
    fn x3dh_kdf_matches_hkdf_with_ff_prefix_and_zero_salt() {
        let dhs = [Zeroizing::new([1u8; 32]), Zeroizing::new([2u8; 32])];
        let mut ikm = vec![0xFF; 32];
        ikm.extend_from_slice(&[1; 32]);
        ikm.extend_from_slice(&[2; 32]);
        let mut expected = [0u8; 32];
        Hkdf::<Sha256>::new(Some(&[0; 32]), &ikm)
            .expand(b"ChatApp_X3DH_v1", &mut expected)
            .unwrap();
        assert_eq!(*kdf(&dhs), expected);
    }
}
