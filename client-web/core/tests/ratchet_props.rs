//! Properties of the pairwise Double Ratchet and of sender-key groups, through the public API:
//! out-of-order delivery, tampering, replay, post-compromise security, member removal, and a
//! full X3DH session with traffic both ways.
#![allow(clippy::unwrap_used)]

use chat_core::group::{GroupError, GroupState, SenderKeyDistribution};
use chat_core::identity::{DeviceKeys, IdentityKeyPair, PreKeyBundle};
use chat_core::ratchet::{Session, SessionError, initial_header};
use proptest::prelude::*;
use rand_core::OsRng;

/// Alice starts a session from Bob's published bundle; Bob accepts her first message.
fn established() -> (Session, Session) {
    let alice = IdentityKeyPair::generate(&mut OsRng);
    let mut bob_keys = DeviceKeys::generate(&mut OsRng);
    let otk = bob_keys.generate_one_time_prekeys(10, &mut OsRng)[3];
    let bundle = PreKeyBundle::decode(&bob_keys.bundle(Some(otk.id)).encode()).unwrap();
    let mut a = Session::initiate(&alice, &bundle, &mut OsRng).unwrap();
    let first = a.encrypt(b"first", &mut OsRng).unwrap();
    let (b, plaintext) = Session::accept(&mut bob_keys, &first).unwrap();
    assert_eq!(plaintext, b"first");
    (a, b)
}

/// Alice's messages `0..n`, the first `split` in one sending chain and the rest in the next
/// (after a reply from Bob), so that delivery crosses a DH ratchet step.
fn two_chains(a: &mut Session, b: &mut Session, n: usize, split: usize) -> Vec<Vec<u8>> {
    let mut msgs = Vec::with_capacity(n);
    for i in 0..n {
        if i == split {
            let reply = b.encrypt(b"reply", &mut OsRng).unwrap();
            a.decrypt(&reply).unwrap();
        }
        msgs.push(
            a.encrypt(format!("message {i}").as_bytes(), &mut OsRng)
                .unwrap(),
        );
    }
    msgs
}

fn permutation(max: usize) -> impl Strategy<Value = Vec<usize>> {
    (1..=max).prop_flat_map(|n| Just((0..n).collect::<Vec<_>>()).prop_shuffle())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_permutation_within_the_skip_cap_decrypts_each_message_exactly_once(
        order in permutation(40),
        split_at in 0usize..40,
    ) {
        let (mut a, mut b) = established();
        let n = order.len();
        let msgs = two_chains(&mut a, &mut b, n, split_at % n);
        for &i in &order {
            prop_assert_eq!(b.decrypt(&msgs[i]).unwrap(), format!("message {i}").into_bytes());
        }
        for &i in &order {
            prop_assert_eq!(b.decrypt(&msgs[i]), Err(SessionError::Replay));
        }
    }

    #[test]
    fn any_tampered_header_or_ciphertext_byte_is_refused_and_changes_nothing(
        index in any::<prop::sample::Index>(),
        mask in 1u8..=255,
        initial in any::<bool>(),
    ) {
        let (mut a, mut b) = established();
        if !initial {
            let reply = b.encrypt(b"reply", &mut OsRng).unwrap();
            a.decrypt(&reply).unwrap();
        }
        let msg = a.encrypt(b"do not touch", &mut OsRng).unwrap();
        prop_assert_eq!(initial_header(&msg).unwrap().is_some(), initial);
        let mut bad = msg.clone();
        bad[index.index(msg.len())] ^= mask;
        let before = b.encode();
        prop_assert!(b.decrypt(&bad).is_err());
        prop_assert_eq!(&*b.encode(), &*before);
        prop_assert_eq!(b.decrypt(&msg).unwrap(), b"do not touch".to_vec());
    }

    #[test]
    fn a_replayed_message_is_refused(n in 1usize..20, pick in any::<prop::sample::Index>()) {
        let (mut a, mut b) = established();
        let msgs: Vec<_> = (0..n).map(|_| a.encrypt(b"once", &mut OsRng).unwrap()).collect();
        for m in &msgs {
            b.decrypt(m).unwrap();
        }
        let replay = &msgs[pick.index(n)];
        prop_assert_eq!(b.decrypt(replay), Err(SessionError::Replay));
    }

    #[test]
    fn an_attackers_copy_of_the_state_stops_decrypting_after_a_dh_round_trip(
        before in 0usize..5,
        after in 1usize..5,
    ) {
        let (mut a, mut b) = established();
        for _ in 0..before {
            b.decrypt(&a.encrypt(b"x", &mut OsRng).unwrap()).unwrap();
        }
        // The attacker steals Bob's whole state.
        let mut stolen = Session::decode(&b.encode()).unwrap();
        let m = a.encrypt(b"still readable", &mut OsRng).unwrap();
        prop_assert_eq!(stolen.decrypt(&m).unwrap(), b"still readable".to_vec());
        b.decrypt(&m).unwrap();

        // Bob replies with a fresh ratchet key; Alice answers with hers.
        a.decrypt(&b.encrypt(b"reply", &mut OsRng).unwrap()).unwrap();
        for _ in 0..after {
            let healed = a.encrypt(b"private again", &mut OsRng).unwrap();
            prop_assert!(stolen.decrypt(&healed).is_err());
            prop_assert_eq!(b.decrypt(&healed).unwrap(), b"private again".to_vec());
        }
    }

    #[test]
    fn a_removed_group_member_cannot_decrypt_after_removal(
        size in 3usize..6,
        removed in any::<prop::sample::Index>(),
        sent_after in 1usize..4,
    ) {
        let names: Vec<String> = (0..size).map(|i| format!("member-{i}")).collect();
        let mut states: Vec<GroupState> = names
            .iter()
            .map(|me| {
                let others = names.iter().filter(|n| *n != me).map(String::as_str);
                GroupState::new(b"g", me, others, &mut OsRng).unwrap()
            })
            .collect();
        let dists: Vec<_> = states.iter().map(GroupState::own_distribution).collect();
        for (i, s) in states.iter_mut().enumerate() {
            for (j, d) in dists.iter().enumerate() {
                if i != j {
                    s.process_distribution(&names[j], d).unwrap();
                }
            }
        }
        let gone = removed.index(size);
        // Every remaining member removes the member and sends its new sender key to the others.
        let mut outbox: Vec<(usize, String, Vec<u8>)> = Vec::new();
        for i in (0..size).filter(|&i| i != gone) {
            for (to, dist) in states[i].remove_member(&names[gone], &mut OsRng).unwrap() {
                prop_assert_ne!(&to, &names[gone]);
                outbox.push((i, to, dist.encode().to_vec()));
            }
        }
        for (from, to, bytes) in outbox {
            let to = names.iter().position(|n| *n == to).unwrap();
            let dist = SenderKeyDistribution::decode(&bytes).unwrap();
            states[to].process_distribution(&names[from], &dist).unwrap();
        }
        for sender in (0..size).filter(|&i| i != gone) {
            for _ in 0..sent_after {
                let m = states[sender].encrypt(b"after removal").unwrap();
                let refused = matches!(
                    states[gone].decrypt(&m),
                    Err(GroupError::UnknownSenderKey { .. })
                );
                prop_assert!(refused, "the removed member decrypted or failed unexpectedly");
                for r in (0..size).filter(|&r| r != gone && r != sender) {
                    prop_assert_eq!(states[r].decrypt(&m).unwrap().plaintext, b"after removal".to_vec());
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic_any_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let (_, mut b) = established();
        let before = b.encode();
        prop_assert!(b.decrypt(&bytes).is_err());
        prop_assert_eq!(&*b.encode(), &*before);
        let _ = Session::decode(&bytes);
        let _ = PreKeyBundle::decode(&bytes);
        let _ = DeviceKeys::decode(&bytes);
        let _ = GroupState::decode(&bytes);
        let _ = SenderKeyDistribution::decode(&bytes);
        let _ = initial_header(&bytes);
    }
}

#[test]
fn initial_message_to_the_previous_signed_prekey_still_starts_a_session() {
    let alice = IdentityKeyPair::generate(&mut OsRng);
    let mut bob_keys = DeviceKeys::generate(&mut OsRng);
    let stale_bundle = bob_keys.bundle(None);
    bob_keys.rotate_signed_prekey(&mut OsRng);
    let mut a = Session::initiate(&alice, &stale_bundle, &mut OsRng).unwrap();
    let first = a.encrypt(b"sent before rotation", &mut OsRng).unwrap();
    let (_, plaintext) = Session::accept(&mut bob_keys, &first).unwrap();
    assert_eq!(plaintext, b"sent before rotation");
}

#[test]
fn full_x3dh_then_a_hundred_messages_each_way() {
    let (mut a, mut b) = established();
    for i in 0..100u32 {
        let to_bob = vec![i as u8; (i as usize * 37) % 700];
        let to_alice = format!("reply {i}").into_bytes();
        assert_eq!(
            b.decrypt(&a.encrypt(&to_bob, &mut OsRng).unwrap()).unwrap(),
            to_bob
        );
        assert_eq!(
            a.decrypt(&b.encrypt(&to_alice, &mut OsRng).unwrap())
                .unwrap(),
            to_alice
        );
        if i % 25 == 0 {
            a = Session::decode(&a.encode()).unwrap();
            b = Session::decode(&b.encode()).unwrap();
        }
    }
    // A burst one way, then the other, across restores.
    let burst: Vec<_> = (0..10)
        .map(|i| a.encrypt(&[i], &mut OsRng).unwrap())
        .collect();
    for (i, m) in burst.iter().enumerate().rev() {
        assert_eq!(b.decrypt(m).unwrap(), vec![i as u8]);
    }
}

#[test]
fn ciphertext_lengths_reveal_only_the_padding_bucket() {
    let (mut a, _) = established();
    let short = a.encrypt(b"a", &mut OsRng).unwrap();
    let longer = a.encrypt(&[7u8; 60], &mut OsRng).unwrap();
    assert_eq!(short.len(), longer.len());
}
