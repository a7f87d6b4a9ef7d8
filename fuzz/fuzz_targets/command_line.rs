//! Any argument vector (NUL-separated bytes): parsing and turning a
//! `generate` line into a request never panic.
#![no_main]

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use sd3_wgpu::cli::{generate_outputs, Cli, Command};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let argv = std::iter::once("sd3").chain(text.split('\0'));
    if let Ok(cli) = Cli::try_parse_from(argv) {
        if let Command::Generate(a) = &cli.command {
            let _ = generate_outputs(a);
            let _ = sd3_wgpu::cli::pipeline_options(&cli, a);
        }
    }
});
