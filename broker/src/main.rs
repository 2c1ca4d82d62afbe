//! The `fleetgate` binary: everything is in [`broker::cli`].

fn main() -> std::process::ExitCode {
    broker::cli::main()
}
