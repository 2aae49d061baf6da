//! Progress display for long work: an indicatif spinner on stderr when it is a terminal, nothing
//! otherwise (scripts and CI see only the final line). `NO_COLOR` is honoured.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A spinner with a message; hidden when stderr is not a terminal.
pub fn spinner(message: String) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    let template = if std::env::var_os("NO_COLOR").is_some() {
        "{spinner} {msg}"
    } else {
        "{spinner:.cyan} {msg}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}
