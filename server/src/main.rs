//! The `chat-server` binary (see `chat_server::cli`).
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    chat_server::cli::main()
}
