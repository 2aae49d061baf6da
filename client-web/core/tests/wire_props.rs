//! Property tests of the wire protocol (`chat_core::wire`): decoding never panics on arbitrary or
//! mutated bytes, every valid value round-trips, and encoding is canonical (whatever decodes
//! re-encodes to the same bytes).

use chat_core::codec::DecodeError;
use chat_core::wire::*;
use proptest::collection::vec;
use proptest::prelude::*;

fn username() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_.-]{2,31}"
}

/// Any string within the username wire limit, valid or not (the server judges validity).
fn wire_username() -> impl Strategy<Value = String> {
    prop_oneof![username(), "\\PC{0,16}"]
}

fn small_bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..128)
}

fn hashes(max: usize) -> impl Strategy<Value = Vec<[u8; 32]>> {
    vec(any::<[u8; 32]>(), 0..=max.min(8))
}

fn signed_prekey() -> impl Strategy<Value = SignedPrekey> {
    (any::<u32>(), any::<[u8; 32]>(), vec(any::<u8>(), 64)).prop_map(|(id, public, sig)| {
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&sig);
        SignedPrekey {
            id,
            public,
            signature,
        }
    })
}

fn signature() -> impl Strategy<Value = [u8; 64]> {
    vec(any::<u8>(), 64).prop_map(|v| {
        let mut out = [0u8; 64];
        out.copy_from_slice(&v);
        out
    })
}

fn one_time_prekey() -> impl Strategy<Value = OneTimePrekey> {
    (any::<u32>(), any::<[u8; 32]>()).prop_map(|(id, public)| OneTimePrekey { id, public })
}

fn one_time_prekeys() -> impl Strategy<Value = Vec<OneTimePrekey>> {
    vec(one_time_prekey(), 0..=8)
}

fn device_bundle() -> impl Strategy<Value = DeviceBundle> {
    (
        any::<u32>(),
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
        signature(),
        signed_prekey(),
        proptest::option::of(one_time_prekey()),
        any::<u64>(),
    )
        .prop_map(
            |(
                device_id,
                identity_ed25519,
                identity_x25519,
                identity_signature,
                signed_prekey,
                one_time_prekey,
                leaf_index,
            )| {
                DeviceBundle {
                    device_id,
                    identity_ed25519,
                    identity_x25519,
                    identity_signature,
                    signed_prekey,
                    one_time_prekey,
                    leaf_index,
                }
            },
        )
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        (any::<u8>(), "\\PC{0,16}").prop_map(|(protocol_version, client_name)| {
            ClientFrame::Hello {
                protocol_version,
                client_name,
            }
        }),
        (
            wire_username(),
            any::<u32>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            signature(),
            signed_prekey(),
            one_time_prekeys()
        )
            .prop_map(
                |(
                    username,
                    device_id,
                    identity_ed25519,
                    identity_x25519,
                    identity_signature,
                    signed_prekey,
                    one_time_prekeys,
                )| {
                    ClientFrame::Register {
                        username,
                        device_id,
                        identity_ed25519,
                        identity_x25519,
                        identity_signature,
                        signed_prekey,
                        one_time_prekeys,
                    }
                }
            ),
        (wire_username(), any::<u32>()).prop_map(|(username, device_id)| ClientFrame::Login {
            username,
            device_id
        }),
        signature().prop_map(|signature| ClientFrame::LoginProof { signature }),
        one_time_prekeys()
            .prop_map(|one_time_prekeys| ClientFrame::UploadPrekeys { one_time_prekeys }),
        (
            any::<[u8; 16]>(),
            wire_username(),
            any::<u32>(),
            small_bytes()
        )
            .prop_map(
                |(message_id, to_user, to_device, envelope)| ClientFrame::Send {
                    message_id,
                    to_user,
                    to_device,
                    envelope,
                }
            ),
        any::<u64>().prop_map(|up_to_seq| ClientFrame::Ack { up_to_seq }),
        (any::<u32>(), wire_username()).prop_map(|(request_id, username)| {
            ClientFrame::FetchBundle {
                request_id,
                username,
            }
        }),
        (any::<u32>(), proptest::option::of(any::<u64>())).prop_map(|(request_id, known_size)| {
            ClientFrame::GetTreeHead {
                request_id,
                known_size,
            }
        }),
        (any::<u32>(), wire_username(), any::<u32>()).prop_map(
            |(request_id, username, device_id)| ClientFrame::GetInclusion {
                request_id,
                username,
                device_id,
            }
        ),
        (any::<u32>(), any::<u64>(), 0..=MAX_LEAVES_PER_FRAME as u32).prop_map(
            |(request_id, start, count)| ClientFrame::GetLeaves {
                request_id,
                start,
                count,
            }
        ),
        any::<u64>().prop_map(|nonce| ClientFrame::Ping { nonce }),
    ]
}

fn error_scope() -> impl Strategy<Value = ErrorScope> {
    prop_oneof![
        Just(ErrorScope::Connection),
        any::<u32>().prop_map(ErrorScope::Request),
        any::<[u8; 16]>().prop_map(ErrorScope::Message),
    ]
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    prop_oneof![
        (any::<u8>(), "\\PC{0,16}", any::<u32>()).prop_map(
            |(protocol_version, server_name, max_envelope_bytes)| ServerFrame::ServerHello {
                protocol_version,
                server_name,
                max_envelope_bytes,
            }
        ),
        (wire_username(), any::<u32>(), any::<u64>()).prop_map(
            |(username, device_id, leaf_index)| ServerFrame::Registered {
                username,
                device_id,
                leaf_index,
            }
        ),
        any::<[u8; 32]>().prop_map(|nonce| ServerFrame::Challenge { nonce }),
        (wire_username(), any::<u32>(), any::<u64>()).prop_map(
            |(username, device_id, mailbox_next_seq)| ServerFrame::Welcome {
                username,
                device_id,
                mailbox_next_seq,
            }
        ),
        any::<u32>().prop_map(|available| ServerFrame::PrekeyStatus { available }),
        (any::<[u8; 16]>(), any::<bool>()).prop_map(|(message_id, duplicate)| {
            ServerFrame::SendAck {
                message_id,
                duplicate,
            }
        }),
        (
            any::<u64>(),
            any::<[u8; 16]>(),
            wire_username(),
            any::<u32>(),
            any::<u64>(),
            small_bytes()
        )
            .prop_map(
                |(seq, message_id, from_user, from_device, server_time, envelope)| {
                    ServerFrame::Deliver {
                        seq,
                        message_id,
                        from_user,
                        from_device,
                        server_time,
                        envelope,
                    }
                }
            ),
        (any::<u32>(), wire_username(), vec(device_bundle(), 0..=3)).prop_map(
            |(request_id, username, devices)| ServerFrame::Bundle {
                request_id,
                username,
                devices,
            }
        ),
        (
            any::<u32>(),
            small_bytes(),
            hashes(MAX_CONSISTENCY_PROOF_HASHES)
        )
            .prop_map(|(request_id, signed_head, consistency_proof)| {
                ServerFrame::TreeHead {
                    request_id,
                    signed_head,
                    consistency_proof,
                }
            }),
        (
            any::<u32>(),
            small_bytes(),
            any::<u64>(),
            any::<u64>(),
            hashes(MAX_INCLUSION_PROOF_HASHES)
        )
            .prop_map(|(request_id, leaf, leaf_index, tree_size, proof)| {
                ServerFrame::Inclusion {
                    request_id,
                    leaf,
                    leaf_index,
                    tree_size,
                    proof,
                }
            }),
        (any::<u32>(), any::<u64>(), vec(small_bytes(), 0..=4)).prop_map(
            |(request_id, start, leaves)| ServerFrame::Leaves {
                request_id,
                start,
                leaves,
            }
        ),
        (
            error_scope(),
            proptest::sample::select(ErrorCode::ALL.to_vec()),
            "\\PC{0,32}"
        )
            .prop_map(|(scope, code, message)| ServerFrame::Error {
                scope,
                code,
                message,
            }),
        any::<u64>().prop_map(|nonce| ServerFrame::Pong { nonce }),
    ]
}

fn envelope() -> impl Strategy<Value = Envelope> {
    prop_oneof![
        (
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            signature(),
            any::<[u8; 32]>(),
            any::<u32>(),
            proptest::option::of(any::<u32>()),
            small_bytes()
        )
            .prop_map(
                |(
                    sender_identity_ed25519,
                    sender_identity_x25519,
                    sender_identity_signature,
                    ephemeral_x25519,
                    signed_prekey_id,
                    one_time_prekey_id,
                    message,
                )| Envelope::PreKeyMessage {
                    sender_identity_ed25519,
                    sender_identity_x25519,
                    sender_identity_signature,
                    ephemeral_x25519,
                    signed_prekey_id,
                    one_time_prekey_id,
                    message,
                }
            ),
        small_bytes().prop_map(|message| Envelope::RatchetMessage { message }),
        (any::<[u8; 16]>(), small_bytes())
            .prop_map(|(group_id, message)| Envelope::GroupMessage { group_id, message }),
        (any::<[u8; 16]>(), small_bytes()).prop_map(|(group_id, message)| {
            Envelope::SenderKeyDistribution { group_id, message }
        }),
    ]
}

fn directory_leaf() -> impl Strategy<Value = DirectoryLeaf> {
    (
        username(),
        any::<u32>(),
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
        signature(),
        any::<u32>(),
        any::<[u8; 32]>(),
        signature(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(
                username,
                device_id,
                identity_ed25519,
                identity_x25519,
                identity_signature,
                signed_prekey_id,
                signed_prekey_public,
                signed_prekey_signature,
                version,
                timestamp,
            )| DirectoryLeaf {
                username,
                device_id,
                identity_ed25519,
                identity_x25519,
                identity_signature,
                signed_prekey_id,
                signed_prekey_public,
                signed_prekey_signature,
                version,
                timestamp,
            },
        )
}

/// A byte-level change to a valid encoding.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, xor: u8 },
    Truncate { at: usize },
    Insert { at: usize, byte: u8 },
    Remove { at: usize },
    SetU32 { at: usize, value: u32 },
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let one = prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        any::<usize>().prop_map(|at| Mutation::Remove { at }),
        (
            any::<usize>(),
            prop_oneof![Just(0u32), Just(1), Just(u32::MAX), any::<u32>()]
        )
            .prop_map(|(at, value)| Mutation::SetU32 { at, value }),
    ];
    vec(one, 1..4)
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len();
        match *m {
            Mutation::Flip { at, xor } if len > 0 => bytes[at % len] ^= xor,
            Mutation::Truncate { at } => bytes.truncate(at % (len + 1)),
            Mutation::Insert { at, byte } => bytes.insert(at % (len + 1), byte),
            Mutation::Remove { at } if len > 0 => {
                bytes.remove(at % len);
            }
            Mutation::SetU32 { at, value } if len >= 4 => {
                let at = at % (len - 3);
                bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
            }
            _ => {}
        }
    }
    bytes
}

/// Decoding `bytes` never panics, and whatever decodes re-encodes to exactly `bytes`.
fn check_canonical<T: PartialEq + std::fmt::Debug>(
    bytes: &[u8],
    decode: fn(&[u8]) -> Result<T, DecodeError>,
    encode: fn(&T) -> Vec<u8>,
) -> Result<(), TestCaseError> {
    if let Ok(value) = decode(bytes) {
        prop_assert_eq!(encode(&value), bytes);
    }
    Ok(())
}

proptest! {
    #[test]
    fn client_frame_round_trips(frame in client_frame()) {
        prop_assert_eq!(ClientFrame::decode(&frame.encode()), Ok(frame));
    }

    #[test]
    fn server_frame_round_trips(frame in server_frame()) {
        prop_assert_eq!(ServerFrame::decode(&frame.encode()), Ok(frame));
    }

    #[test]
    fn envelope_round_trips(envelope in envelope()) {
        prop_assert_eq!(Envelope::decode(&envelope.encode()), Ok(envelope));
    }

    #[test]
    fn directory_leaf_round_trips(leaf in directory_leaf()) {
        prop_assert_eq!(DirectoryLeaf::decode(&leaf.encode()), Ok(leaf));
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics_and_is_canonical(
        bytes in vec(any::<u8>(), 0..256),
    ) {
        check_canonical(&bytes, ClientFrame::decode, ClientFrame::encode)?;
        check_canonical(&bytes, ServerFrame::decode, ServerFrame::encode)?;
        check_canonical(&bytes, Envelope::decode, Envelope::encode)?;
        check_canonical(&bytes, DirectoryLeaf::decode, DirectoryLeaf::encode)?;
    }

    #[test]
    fn decoding_frame_shaped_bytes_never_panics_and_is_canonical(
        tag in any::<u8>(),
        body in vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = vec![PROTOCOL_VERSION, tag];
        bytes.extend_from_slice(&body);
        check_canonical(&bytes, ClientFrame::decode, ClientFrame::encode)?;
        check_canonical(&bytes, ServerFrame::decode, ServerFrame::encode)?;
        let mut envelope = vec![ENVELOPE_VERSION, tag];
        envelope.extend_from_slice(&body);
        check_canonical(&envelope, Envelope::decode, Envelope::encode)?;
    }

    #[test]
    fn decoding_a_mutated_client_frame_never_panics_and_is_canonical(
        frame in client_frame(),
        mutations in mutations(),
    ) {
        let bytes = mutate(frame.encode(), &mutations);
        check_canonical(&bytes, ClientFrame::decode, ClientFrame::encode)?;
    }

    #[test]
    fn decoding_a_mutated_server_frame_never_panics_and_is_canonical(
        frame in server_frame(),
        mutations in mutations(),
    ) {
        let bytes = mutate(frame.encode(), &mutations);
        check_canonical(&bytes, ServerFrame::decode, ServerFrame::encode)?;
    }

    #[test]
    fn decoding_a_mutated_envelope_or_leaf_never_panics_and_is_canonical(
        envelope in envelope(),
        leaf in directory_leaf(),
        mutations in mutations(),
    ) {
        let bytes = mutate(envelope.encode(), &mutations);
        check_canonical(&bytes, Envelope::decode, Envelope::encode)?;
        let bytes = mutate(leaf.encode(), &mutations);
        check_canonical(&bytes, DirectoryLeaf::decode, DirectoryLeaf::encode)?;
    }

    #[test]
    fn a_frame_with_trailing_bytes_is_refused(
        frame in client_frame(),
        extra in vec(any::<u8>(), 1..8),
    ) {
        let mut bytes = frame.encode();
        bytes.extend_from_slice(&extra);
        prop_assert_eq!(
            ClientFrame::decode(&bytes),
            Err(DecodeError::TrailingBytes(extra.len()))
        );
    }

    #[test]
    fn a_truncated_frame_is_refused(frame in server_frame(), cut in any::<usize>()) {
        let bytes = frame.encode();
        let len = cut % bytes.len();
        prop_assert!(ServerFrame::decode(&bytes[..len]).is_err());
    }

    #[test]
    fn only_valid_usernames_pass_validation(name in "\\PC{0,40}") {
        let valid = (USERNAME_MIN_LEN..=USERNAME_MAX_LEN).contains(&name.chars().count())
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-.".contains(c));
        prop_assert_eq!(validate_username(&name).is_ok(), valid);
    }

    #[test]
    fn generated_usernames_are_valid(name in username()) {
        prop_assert_eq!(validate_username(&name), Ok(()));
    }
}
