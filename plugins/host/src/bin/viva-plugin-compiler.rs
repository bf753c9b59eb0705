//! A compile child for tests and other embedders: reads a component on
//! stdin and writes the compiled artifact to stdout (see
//! `viva_plugins::Compiler::Subprocess`). The `viva` binary has the same
//! entry point as a hidden subcommand.

use std::process::ExitCode;

fn main() -> ExitCode {
    match viva_plugins::run_compile_child(std::io::stdin().lock(), std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
