//! TEST ONLY: `chat-server` with the `--hostile MODE` attacks of `chat_server::hostile`.
//! Built only with the `hostile` feature; never shipped.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    chat_server::cli::main()
}
