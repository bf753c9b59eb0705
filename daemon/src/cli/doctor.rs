//! `viva doctor`: prints the installation checks of [`crate::doctor`], one
//! line each (ok / warn / FAIL, with the fix below a warn or fail), or the
//! report as JSON with `--json`. Exits 1 when any check fails.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::config::Config;
use crate::doctor::{self, Report};

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Print the report as JSON (for monitoring).
    #[arg(long)]
    pub json: bool,
    /// Do not start the model workers (quicker; their load time and memory
    /// are then not measured).
    #[arg(long)]
    pub no_load: bool,
}

/// Runs the checks on `config` (or reports why it does not load) and prints
/// them.
pub fn run(
    args: &DoctorArgs,
    file: Option<PathBuf>,
    config: anyhow::Result<Config>,
) -> anyhow::Result<ExitCode> {
    let report = match config {
        Err(e) => Report::new(vec![doctor::config_error(file.as_deref(), &e)]),
        Ok(config) => {
            let runtime = super::runtime()?;
            let inputs = doctor::local_inputs(&config, file, !args.no_load);
            runtime.block_on(doctor::run(&inputs))
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
