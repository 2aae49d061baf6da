//! `chatctl audit URL`: replays the whole key directory of a server and reports every problem
//! with the user and entry involved.
//!
//! It fetches every leaf (`GetLeaves`, in pages) and the latest signed head, recomputes the
//! RFC 9162 root, checks the head's signature, checks consistency with the head recorded by the
//! previous audit of the log signed by the same directory key (`STATE_DIR/KEY-ID.state`: one
//! log per directory key, whichever host or port serves it) and with the heads clients saw (`--client-state`,
//! a client's `directory.state`), and decodes every leaf: username rules, identity and signed
//! prekey signatures, versions counting up by one per device, timestamps that never go back.
//! Exit status 1 when anything is wrong; the recorded head only moves forward on a clean audit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use chat_core::codec::Reader;
use chat_core::wire::{ClientFrame, DirectoryLeaf, MAX_LEAVES_PER_FRAME, ServerFrame};
use chat_signing::merkle::{MerkleLog, verify_consistency};
use chat_signing::tree_head::{DirectoryPublicKey, SignedTreeHead};
use chatctl::client::conn::Connection;
use chatctl::files::{Mode, write_atomic};
use clap::Args;
use serde::Serialize;

/// First line of an audit state file.
const STATE_HEADER: &str = "chatapp audit state v1";

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    chatctl audit https://chat.example.org:8443\n  \
    chatctl audit https://localhost:8443 --ca .chatctl/keys/tls/ca.pem --json\n  \
    chatctl audit https://localhost:8443 --client-state .chatctl/clients/alice/directory.state\n\n\
    Exit status: 0 the log is sound, 1 a problem was found (each is printed with its entry).")]
pub struct AuditArgs {
    /// The server whose key directory to audit.
    pub url: String,
    /// The CA certificate that issued the server's certificate.
    #[arg(long, default_value = ".chatctl/keys/tls/ca.pem")]
    pub ca: PathBuf,
    /// The directory public key every tree head must be signed with.
    #[arg(long, default_value = ".chatctl/keys/directory.pub")]
    pub directory_key: PathBuf,
    /// Where the head of the last clean audit of each server is kept.
    #[arg(long, default_value = ".chatctl/audit")]
    pub state_dir: PathBuf,
    /// A client's `directory.state`: every head it accepted must be a prefix of this log
    /// (catches split views). Repeatable.
    #[arg(long)]
    pub client_state: Vec<PathBuf>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// One thing wrong with the log, naming the entry and user where there is one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub entry: Option<u64>,
    pub user: Option<String>,
    pub device: Option<u32>,
    pub problem: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(entry) = self.entry {
            write!(f, "entry {entry}")?;
            if let (Some(user), Some(device)) = (&self.user, self.device) {
                write!(f, " ({user} device {device})")?;
            }
            write!(f, ": ")?;
        }
        write!(f, "{}", self.problem)
    }
}

fn problem(problem: String) -> Problem {
    Problem {
        entry: None,
        user: None,
        device: None,
        problem,
    }
}

/// A key change seen in the log (a device's version above 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyChange {
    pub entry: u64,
    pub user: String,
    pub device: u32,
    pub version: u64,
    pub timestamp: u64,
}

/// What an audit found.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub url: String,
    pub tree_size: u64,
    pub root: String,
    pub head_timestamp: u64,
    pub users: usize,
    pub devices: usize,
    pub key_changes: Vec<KeyChange>,
    pub problems: Vec<Problem>,
}

/// Checks every leaf on its own and against the ones before it.
pub fn check_leaves(leaves: &[Vec<u8>]) -> (Vec<Problem>, Vec<KeyChange>, usize, usize) {
    let mut problems = Vec::new();
    let mut changes = Vec::new();
    let mut versions: BTreeMap<(String, u32), u64> = BTreeMap::new();
    let mut last_time = 0u64;
    for (index, bytes) in leaves.iter().enumerate() {
        let entry = index as u64;
        let leaf = match DirectoryLeaf::decode(bytes) {
            Ok(l) => l,
            Err(e) => {
                problems.push(Problem {
                    entry: Some(entry),
                    user: None,
                    device: None,
                    problem: format!("undecodable leaf (an invalid username is refused too): {e}"),
                });
                continue;
            }
        };
        let at = |problem: String| Problem {
            entry: Some(entry),
            user: Some(leaf.username.clone()),
            device: Some(leaf.device_id),
            problem,
        };
        match chatctl::client::identity_from_parts(
            &leaf.identity_ed25519,
            &leaf.identity_x25519,
            &leaf.identity_signature,
        ) {
            Ok(identity) => {
                let spk = chat_core::identity::SignedPreKey {
                    id: leaf.signed_prekey_id,
                    key: leaf.signed_prekey_public.into(),
                    signature: ed25519_dalek::Signature::from_bytes(&leaf.signed_prekey_signature),
                };
                if let Err(e) = spk.verify(&identity) {
                    problems.push(at(format!("signed prekey: {e}")));
                }
            }
            Err(e) => problems.push(at(format!("identity keys: {e:#}"))),
        }
        let key = (leaf.username.clone(), leaf.device_id);
        let expected = versions.get(&key).map_or(1, |v| v + 1);
        if leaf.version != expected {
            problems.push(at(format!(
                "version {} where {expected} was due (versions count up by one per device)",
                leaf.version
            )));
        }
        if leaf.version > 1 {
            changes.push(KeyChange {
                entry,
                user: leaf.username.clone(),
                device: leaf.device_id,
                version: leaf.version,
                timestamp: leaf.timestamp,
            });
        }
        versions.insert(key, leaf.version.max(expected));
        if leaf.timestamp < last_time {
            problems.push(at(format!(
                "timestamp {} is earlier than the entry before ({last_time}): time ran backwards",
                leaf.timestamp
            )));
        }
        last_time = last_time.max(leaf.timestamp);
    }
    let users = versions
        .keys()
        .map(|(u, _)| u.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    (problems, changes, users, versions.len())
}

/// The (size, root) pairs a client's verifier accepted (`DirectoryVerifier::to_bytes`, PROTOCOL.md §13).
pub fn client_heads(bytes: &[u8]) -> Result<Vec<(u64, [u8; 32])>> {
    let mut r = Reader::new(bytes);
    let version = r.u8()?;
    if version != chat_core::directory::STATE_VERSION {
        bail!("unknown directory state version {version}");
    }
    let _key: [u8; 32] = r.array()?;
    let count = r.u32()?;
    if count as usize > chat_core::directory::MAX_REMEMBERED_HEADS {
        bail!("directory state lists {count} heads");
    }
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let size = r.u64()?;
        let root: [u8; 32] = r.array()?;
        let _first = r.u64()?;
        let _last = r.u64()?;
        out.push((size, root));
    }
    r.finish()?;
    Ok(out)
}

/// The heads in `heads` that this log contradicts.
pub fn check_heads_against_log(
    log: &MerkleLog,
    heads: &[(u64, [u8; 32])],
    whose: &str,
) -> Vec<Problem> {
    let mut out = Vec::new();
    for (size, root) in heads {
        match log.root_at(*size) {
            Ok(actual) if actual == *root => {}
            Ok(actual) => out.push(problem(format!(
                "{whose} accepted a head of size {size} with root {}, but this log has root {} at that size: \
                 the server showed them a different log (split view or fork)",
                hex::encode(root),
                hex::encode(actual)
            ))),
            Err(_) => out.push(problem(format!(
                "{whose} accepted a head of size {size}, larger than the log the server shows the auditor ({}): split view",
                log.len()
            ))),
        }
    }
    out
}

/// One state file per directory key: every server holding that key must serve one log.
fn state_path(dir: &Path, key: &DirectoryPublicKey) -> PathBuf {
    dir.join(format!("{}.state", key.key_id_hex()))
}

fn read_state(path: &Path) -> Result<Option<SignedTreeHead>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut lines = text.lines();
    if lines.next() != Some(STATE_HEADER) {
        bail!("{} is not an audit state file", path.display());
    }
    let bytes = hex::decode(lines.next().unwrap_or_default().trim())
        .with_context(|| format!("{}: bad hex", path.display()))?;
    let head =
        SignedTreeHead::from_bytes(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(Some(head))
}

async fn fetch(
    conn: &mut Connection,
    known_size: Option<u64>,
) -> Result<(SignedTreeHead, Vec<[u8; 32]>, Vec<Vec<u8>>)> {
    let (head, proof) = match conn
        .request(|id| ClientFrame::GetTreeHead {
            request_id: id,
            known_size,
        })
        .await?
    {
        ServerFrame::TreeHead {
            signed_head,
            consistency_proof,
            ..
        } => (
            SignedTreeHead::from_bytes(&signed_head)
                .map_err(|e| anyhow!("the server sent a bad tree head: {e}"))?,
            consistency_proof,
        ),
        other => bail!("expected TreeHead, got {}", other.name()),
    };
    let mut leaves = Vec::new();
    while (leaves.len() as u64) < head.tree_size {
        let start = leaves.len() as u64;
        let count = (head.tree_size - start).min(MAX_LEAVES_PER_FRAME as u64) as u32;
        let page = match conn
            .request(|id| ClientFrame::GetLeaves {
                request_id: id,
                start,
                count,
            })
            .await?
        {
            ServerFrame::Leaves { leaves, .. } => leaves,
            other => bail!("expected Leaves, got {}", other.name()),
        };
        if page.is_empty() {
            break;
        }
        leaves.extend(page.into_iter().take(count as usize));
    }
    Ok((head, proof, leaves))
}

async fn audit(args: &AuditArgs) -> Result<AuditReport> {
    let key_text = std::fs::read_to_string(&args.directory_key).with_context(|| {
        format!(
            "cannot read the directory public key {}: pass --directory-key or run `chatctl keys init`",
            args.directory_key.display()
        )
    })?;
    let key = DirectoryPublicKey::from_file_string(&key_text)
        .with_context(|| args.directory_key.display().to_string())?;
    let state_file = state_path(&args.state_dir, &key);
    let previous = read_state(&state_file)?;
    let mut conn = Connection::connect(&args.url, &args.ca).await?;
    let known = previous.as_ref().map(|h| h.tree_size).filter(|s| *s > 0);
    let (head, proof, leaves) = fetch(&mut conn, known).await?;
    conn.close().await;

    let mut problems = Vec::new();
    if let Err(e) = head.verify(&key) {
        problems.push(problem(format!(
            "the latest tree head does not verify: {e}"
        )));
    }
    if (leaves.len() as u64) < head.tree_size {
        problems.push(problem(format!(
            "the head covers {} entries but the server handed out only {}",
            head.tree_size,
            leaves.len()
        )));
    }
    let mut log = MerkleLog::new();
    for leaf in &leaves {
        log.push(leaf);
    }
    if log.root() != head.root {
        problems.push(problem(format!(
            "the signed head's root {} is not the root of the entries the server hands out ({}): \
             the server signs one log and shows another",
            hex::encode(head.root),
            hex::encode(log.root())
        )));
    }
    if let Some(prev) = &previous {
        if prev.tree_size > head.tree_size {
            problems.push(problem(format!(
                "the log shrank from {} entries (recorded by the last audit) to {}",
                prev.tree_size, head.tree_size
            )));
        } else {
            problems.extend(check_heads_against_log(
                &log,
                &[(prev.tree_size, prev.root)],
                "the last audit",
            ));
            if prev.tree_size > 0
                && verify_consistency(
                    prev.tree_size,
                    head.tree_size,
                    &prev.root,
                    &head.root,
                    &proof,
                )
                .is_err()
            {
                problems.push(problem(format!(
                    "the server cannot prove that the log of {} entries recorded by the last audit is a prefix of \
                     the current one ({} entries): fork",
                    prev.tree_size, head.tree_size
                )));
            }
        }
    }
    for path in &args.client_state {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let heads = client_heads(&bytes).with_context(|| path.display().to_string())?;
        problems.extend(check_heads_against_log(
            &log,
            &heads,
            &format!("the client of {}", path.display()),
        ));
    }
    let (leaf_problems, key_changes, users, devices) = check_leaves(&leaves);
    problems.extend(leaf_problems);
    if problems.is_empty() {
        std::fs::create_dir_all(&args.state_dir)
            .with_context(|| format!("cannot create {}", args.state_dir.display()))?;
        let text = format!("{STATE_HEADER}\n{}\n", hex::encode(head.to_bytes()));
        write_atomic(&state_file, text.as_bytes(), Mode::Public)?;
    }
    Ok(AuditReport {
        url: args.url.clone(),
        tree_size: head.tree_size,
        root: hex::encode(head.root),
        head_timestamp: head.timestamp,
        users,
        devices,
        key_changes,
        problems,
    })
}

pub fn run(args: AuditArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(audit(&args))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{}: {} entries, {} users, {} devices, root {}",
            report.url, report.tree_size, report.users, report.devices, report.root
        );
        for change in &report.key_changes {
            println!(
                "key change: entry {} {} device {} version {}",
                change.entry, change.user, change.device, change.version
            );
        }
        for p in &report.problems {
            println!("PROBLEM: {p}");
        }
    }
    if !report.problems.is_empty() {
        bail!(
            "the audit of {} found {} problem(s)",
            report.url,
            report.problems.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_core::identity::DeviceKeys;
    use rand_core::OsRng;

    fn leaf(name: &str, device: u32, version: u64, timestamp: u64) -> Vec<u8> {
        let keys = DeviceKeys::generate(&mut OsRng);
        let identity = keys.identity().public();
        let encoded = identity.encode();
        let spk = keys.signed_prekey();
        DirectoryLeaf {
            username: name.into(),
            device_id: device,
            identity_ed25519: *identity.signing_key().as_bytes(),
            identity_x25519: *identity.dh_key().as_bytes(),
            identity_signature: encoded[65..129].try_into().expect("64"),
            signed_prekey_id: spk.id,
            signed_prekey_public: *spk.key.as_bytes(),
            signed_prekey_signature: spk.signature.to_bytes(),
            version,
            timestamp,
        }
        .encode()
    }

    #[test]
    fn a_sound_log_has_no_problem_and_lists_key_changes() {
        let leaves = vec![
            leaf("alice", 1, 1, 10),
            leaf("bob", 1, 1, 11),
            leaf("alice", 1, 2, 12),
        ];
        let (problems, changes, users, devices) = check_leaves(&leaves);
        assert_eq!(problems, vec![]);
        assert_eq!((changes.len(), users, devices), (1, 2, 2));
        assert_eq!(changes[0].entry, 2);
    }

    #[test]
    fn reports_a_version_jump_naming_user_and_entry() {
        let leaves = vec![leaf("alice", 1, 1, 10), leaf("alice", 1, 3, 11)];
        let (problems, ..) = check_leaves(&leaves);
        assert_eq!(problems.len(), 1);
        assert_eq!(
            (problems[0].entry, problems[0].user.as_deref()),
            (Some(1), Some("alice"))
        );
    }

    #[test]
    fn reports_time_running_backwards_and_undecodable_leaves() {
        let leaves = vec![
            leaf("alice", 1, 1, 10),
            leaf("bob", 1, 1, 5),
            b"junk".to_vec(),
        ];
        let (problems, ..) = check_leaves(&leaves);
        let entries: Vec<Option<u64>> = problems.iter().map(|p| p.entry).collect();
        assert_eq!(entries, vec![Some(1), Some(2)]);
    }

    #[test]
    fn reports_a_client_head_the_log_contradicts() {
        let mut log = MerkleLog::new();
        log.push(b"a");
        log.push(b"b");
        let good = (1, log.root_at(1).expect("root"));
        assert!(check_heads_against_log(&log, &[good], "c").is_empty());
        assert_eq!(check_heads_against_log(&log, &[(1, [7; 32])], "c").len(), 1);
        assert_eq!(check_heads_against_log(&log, &[(3, [7; 32])], "c").len(), 1);
    }

    #[test]
    fn state_file_is_named_after_the_directory_key() {
        let key = chat_signing::tree_head::DirectorySigningKey::from_seed(&[1; 32]).public_key();
        let path = state_path(Path::new("d"), &key);
        assert_eq!(
            path,
            Path::new("d").join(format!("{}.state", key.key_id_hex()))
        );
    }
}
