//! Where release-key passphrases come from: `CHATCTL_PASSPHRASE`, else a prompt on the terminal.
//! Passphrases live in `Zeroizing` buffers and are never printed.

use std::io::IsTerminal;

use anyhow::{Result, bail};
use zeroize::Zeroizing;

pub const ENV: &str = "CHATCTL_PASSPHRASE";

/// A passphrase to encrypt a new key: from the environment, or asked twice on the terminal.
pub fn new_passphrase() -> Result<Zeroizing<String>> {
    if let Some(p) = from_env()? {
        return Ok(p);
    }
    require_terminal()?;
    let first = Zeroizing::new(rpassword::prompt_password(
        "Passphrase for the new release key: ",
    )?);
    if first.is_empty() {
        bail!("the passphrase is empty; use --unencrypted for a key without one");
    }
    let second = Zeroizing::new(rpassword::prompt_password("Repeat the passphrase: ")?);
    if first != second {
        bail!("the two passphrases differ; nothing was written");
    }
    Ok(first)
}

/// The passphrase of an existing key.
pub fn existing_passphrase(key_path: &std::path::Path) -> Result<Zeroizing<String>> {
    if let Some(p) = from_env()? {
        return Ok(p);
    }
    require_terminal()?;
    Ok(Zeroizing::new(rpassword::prompt_password(format!(
        "Passphrase for {}: ",
        key_path.display()
    ))?))
}

fn from_env() -> Result<Option<Zeroizing<String>>> {
    match std::env::var(ENV) {
        Ok(p) if p.is_empty() => bail!("{ENV} is set but empty"),
        Ok(p) => Ok(Some(Zeroizing::new(p))),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => bail!("{ENV} is not valid UTF-8"),
    }
}

fn require_terminal() -> Result<()> {
    if !std::io::stdin().is_terminal() {
        bail!(
            "a passphrase is needed but there is no terminal to ask on: set {ENV}, or use an unencrypted key (`chatctl keys init --unencrypted`)"
        );
    }
    Ok(())
}
