//! The `fleetgate` command, built inside this package so that a run (and
//! this package's tests) start the nodes on the code being tested. Same
//! entry point as `broker`'s binary.

fn main() -> std::process::ExitCode {
    broker::cli::main()
}
