//! `loadtest`: the command-line entry. Parses flags, runs the scenario, and
//! turns the result into an exit code: 0 clean, 1 the run failed,
//! 3 the books were violated (see `loadtest::run::EXIT_BOOKS_VIOLATED`).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use loadtest::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(loadtest::run::execute(cli)) {
        Ok(summary) => {
            if summary.exit_code != 0 {
                eprintln!(
                    "the books do not add up: see the violations above and in {}",
                    summary.report_path.display()
                );
            }
            ExitCode::from(summary.exit_code)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
