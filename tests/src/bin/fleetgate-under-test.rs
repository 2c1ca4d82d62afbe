//! The `fleetgate` command, built inside this package so that cargo rebuilds
//! it whenever the end-to-end tests are built (`CARGO_BIN_EXE_*` works only
//! for a package's own binaries). Same entry point as `broker`'s binary.

fn main() -> std::process::ExitCode {
    broker::cli::main()
}
