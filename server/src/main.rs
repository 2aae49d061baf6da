//! The `chat-server` binary (see `chat_server::cli`).
#![forbid(unsafe_code)]

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    chat_server::cli::main()
}
