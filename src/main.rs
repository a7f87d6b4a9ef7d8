//! The `sd3` command line: parses the arguments and runs them through the
//! library's [`sd3_wgpu::cli`].

use std::process::ExitCode;

use clap::Parser;
use sd3_wgpu::cli::{run, Cli};

fn main() -> ExitCode {
    match run(&Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
