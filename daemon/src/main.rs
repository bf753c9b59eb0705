fn main() -> std::process::ExitCode {
    viva_daemon::cli::main()
}
