//! `chatctl keys`: provisions every root of trust into one directory and shows its public parts.
//!
//! Layout of the key directory (secret files are 0600):
//! `release.key`/`release.pub` (minisign), `directory.key`/`directory.pub` (Ed25519 tree-head
//! key), `tls/ca.pem`, `tls/ca.key`, `tls/server.pem`, `tls/server.key`, `data.key`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chat_signing::release::{ReleasePublicKey, ReleaseSecretKey};
use chat_signing::tree_head::{DirectoryPublicKey, DirectorySigningKey};
use clap::{Args, Subcommand};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::files::{Mode, read_text, write_atomic};
use crate::passphrase;

pub const DEFAULT_DIR: &str = ".chatctl/keys";

pub const RELEASE_KEY: &str = "release.key";
pub const RELEASE_PUB: &str = "release.pub";
pub const DIRECTORY_KEY: &str = "directory.key";
pub const DIRECTORY_PUB: &str = "directory.pub";
pub const DATA_KEY: &str = "data.key";
pub const TLS_CA: &str = "tls/ca.pem";
pub const TLS_CA_KEY: &str = "tls/ca.key";
pub const TLS_CERT: &str = "tls/server.pem";
pub const TLS_KEY: &str = "tls/server.key";

/// First line of `data.key`; each following line is `<key id> <base64 32-byte key>`, the last
/// one being the key new records are sealed with. The format is owned by the server's store.
pub const DATA_KEY_HEADER: &str = chat_server::store::seal::DATA_KEY_FILE_HEADER;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create every key ChatApp needs: release signing, key directory, TLS and data at rest.
    #[command(after_help = "Examples:\n  \
        CHATCTL_PASSPHRASE=… chatctl keys init\n  \
        chatctl keys init --dir /srv/chatapp/keys --unencrypted\n\n\
        The release key is encrypted with a passphrase (from CHATCTL_PASSPHRASE or a prompt) the way\n\
        `minisign -G` does; keep it offline. Secret files are written with mode 0600.")]
    Init(InitArgs),
    /// Print the public keys and fingerprints of a key directory.
    #[command(after_help = "Example:\n  chatctl keys show --dir .chatctl/keys")]
    Show(DirArgs),
    /// Add a new key and make it the active one; records sealed with older keys stay readable.
    #[command(
        after_help = "Example:\n  chatctl keys rotate data --dir .chatctl/keys\n\n\
        Appends a data-at-rest key with id = largest id + 1 to data.key (atomically, mode 0600)\n\
        and prints the new active id. Restart the servers to seal new records with it."
    )]
    Rotate(RotateArgs),
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Which key to rotate.
    #[arg(value_enum)]
    pub target: RotateTarget,
    #[command(flatten)]
    pub dir: DirArgs,
}

/// Keys that `chatctl keys rotate` can rotate.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum RotateTarget {
    /// The data-at-rest keys (`data.key`).
    Data,
}

#[derive(Debug, Args)]
pub struct DirArgs {
    /// The key directory.
    #[arg(long, default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// Store the release key without a passphrase (like `minisign -G -W`); for CI and dev keys.
    #[arg(long)]
    pub unencrypted: bool,
    /// Replace existing keys. Everything signed or sealed with the old keys stops verifying.
    #[arg(long)]
    pub force: bool,
}

pub fn run(cmd: KeysCommand) -> Result<()> {
    match cmd {
        KeysCommand::Init(args) => {
            let passphrase = if args.unencrypted {
                None
            } else {
                Some(passphrase::new_passphrase()?)
            };
            let summary = init(
                &args.dir.dir,
                passphrase.as_deref().map(|s| s.as_str()),
                args.force,
            )?;
            println!("Created keys in {}:", args.dir.dir.display());
            print!("{summary}");
            Ok(())
        }
        KeysCommand::Show(args) => {
            print!("{}", show(&args)?);
            Ok(())
        }
        KeysCommand::Rotate(args) => match args.target {
            RotateTarget::Data => {
                let id = rotate_data(&args.dir.dir)?;
                println!("Rotated the data-at-rest key: new active key id {id}");
                Ok(())
            }
        },
    }
}

/// Appends a fresh data-at-rest key (id = largest + 1) to `dir/data.key`; returns its id.
pub fn rotate_data(dir: &Path) -> Result<u32> {
    let path = dir.join(DATA_KEY);
    let text = Zeroizing::new(read_text(&path).map_err(no_keys_hint(dir))?);
    let mut ring = chat_server::store::DataKeyRing::from_file_string(&text)
        .with_context(|| format!("{}", path.display()))?;
    let id = ring
        .rotate(&mut OsRng)
        .with_context(|| format!("{}", path.display()))?;
    write_atomic(&path, ring.to_file_string().as_bytes(), Mode::Secret)?;
    Ok(id)
}

/// Every file `init` writes, relative to the key directory.
pub const ALL_FILES: [&str; 9] = [
    RELEASE_KEY,
    RELEASE_PUB,
    DIRECTORY_KEY,
    DIRECTORY_PUB,
    TLS_CA,
    TLS_CA_KEY,
    TLS_CERT,
    TLS_KEY,
    DATA_KEY,
];

/// Writes a full key directory. Refuses to overwrite any existing key unless `force`.
pub fn init(dir: &Path, passphrase: Option<&str>, force: bool) -> Result<String> {
    let existing: Vec<&str> = ALL_FILES
        .iter()
        .copied()
        .filter(|f| dir.join(f).exists())
        .collect();
    if !existing.is_empty() && !force {
        bail!(
            "{} already holds keys ({}); nothing was changed. Use --force to replace them",
            dir.display(),
            existing.join(", ")
        );
    }

    // Generate everything first, so a failure writes nothing.
    let release =
        ReleaseSecretKey::generate(passphrase).context("cannot generate the release key")?;
    let directory = DirectorySigningKey::generate(&mut OsRng);
    let tls = generate_tls()?;
    let mut data_key = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(data_key.as_mut());
    let data_file = Zeroizing::new(format!(
        "{DATA_KEY_HEADER}\n1 {}\n",
        BASE64.encode(data_key.as_ref())
    ));

    write_atomic(
        &dir.join(RELEASE_KEY),
        release.secret_file.as_bytes(),
        Mode::Secret,
    )?;
    write_atomic(
        &dir.join(RELEASE_PUB),
        release.public.to_file_string().as_bytes(),
        Mode::Public,
    )?;
    let directory_secret = directory.to_file_string();
    write_atomic(
        &dir.join(DIRECTORY_KEY),
        directory_secret.as_bytes(),
        Mode::Secret,
    )?;
    write_atomic(
        &dir.join(DIRECTORY_PUB),
        directory.public_key().to_file_string().as_bytes(),
        Mode::Public,
    )?;
    write_atomic(&dir.join(TLS_CA), tls.ca_pem.as_bytes(), Mode::Public)?;
    write_atomic(
        &dir.join(TLS_CA_KEY),
        tls.ca_key_pem.as_bytes(),
        Mode::Secret,
    )?;
    write_atomic(&dir.join(TLS_CERT), tls.server_pem.as_bytes(), Mode::Public)?;
    write_atomic(
        &dir.join(TLS_KEY),
        tls.server_key_pem.as_bytes(),
        Mode::Secret,
    )?;
    write_atomic(&dir.join(DATA_KEY), data_file.as_bytes(), Mode::Secret)?;

    let mut summary = show(&DirArgs {
        dir: dir.to_owned(),
    })?;
    summary.push_str(&format!(
        "  release key encryption:  {}\n",
        if passphrase.is_some() {
            "passphrase (scrypt, minisign format)"
        } else {
            "none (unencrypted)"
        }
    ));
    Ok(summary)
}

/// The public parts of a key directory, one line each.
pub fn show(args: &DirArgs) -> Result<String> {
    let dir = &args.dir;
    let release_path = dir.join(RELEASE_PUB);
    let release =
        ReleasePublicKey::from_file_string(&read_text(&release_path).map_err(no_keys_hint(dir))?)
            .with_context(|| format!("{}", release_path.display()))?;
    let directory_path = dir.join(DIRECTORY_PUB);
    let directory = DirectoryPublicKey::from_file_string(&read_text(&directory_path)?)
        .with_context(|| format!("{}", directory_path.display()))?;
    let ca = read_text(&dir.join(TLS_CA))?;
    let data_ids = data_key_ids(&read_text(&dir.join(DATA_KEY))?)
        .with_context(|| format!("{}", dir.join(DATA_KEY).display()))?;
    Ok(format!(
        "  release key (minisign):  {} {}\n  directory key (Ed25519): {} {}\n  TLS CA certificate:      sha256 {}\n  data-at-rest keys:       ids {}\n",
        release.key_id(),
        release.to_base64(),
        directory.key_id_hex(),
        BASE64.encode(directory.to_bytes()),
        pem_fingerprint(&ca),
        data_ids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    ))
}

fn no_keys_hint(dir: &Path) -> impl FnOnce(anyhow::Error) -> anyhow::Error + '_ {
    move |e| {
        e.context(format!(
            "no keys in {}: run `chatctl keys init --dir {}`",
            dir.display(),
            dir.display()
        ))
    }
}

/// The key ids in a `data.key` file (without exposing the keys).
pub fn data_key_ids(text: &str) -> Result<Vec<u32>> {
    Ok(chat_server::store::DataKeyRing::from_file_string(text)?.ids())
}

fn pem_fingerprint(pem: &str) -> String {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    match BASE64.decode(body) {
        Ok(der) => hex::encode(Sha256::digest(der)),
        Err(_) => "unreadable".into(),
    }
}

struct TlsMaterial {
    ca_pem: String,
    ca_key_pem: Zeroizing<String>,
    server_pem: String,
    server_key_pem: Zeroizing<String>,
}

/// A local CA and a server certificate for localhost, 127.0.0.1 and ::1 (ECDSA P-256).
fn generate_tls() -> Result<TlsMaterial> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let now = time::OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate().context("cannot generate the CA key")?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "ChatApp local CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = now - time::Duration::hours(1);
    ca.not_after = now + time::Duration::days(3650);
    let ca_cert = ca
        .self_signed(&ca_key)
        .context("cannot make the CA certificate")?;

    let server_key = KeyPair::generate().context("cannot generate the server key")?;
    let mut server = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])?;
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.not_before = now - time::Duration::hours(1);
    server.not_after = now + time::Duration::days(397);
    let server_cert = server
        .signed_by(&server_key, &ca_cert, &ca_key)
        .context("cannot sign the server certificate")?;

    Ok(TlsMaterial {
        ca_pem: ca_cert.pem(),
        ca_key_pem: Zeroizing::new(ca_key.serialize_pem()),
        server_pem: server_cert.pem(),
        server_key_pem: Zeroizing::new(server_key.serialize_pem()),
    })
}
