//! Any bytes as the start of a safetensors file: the header parser returns
//! `Ok` or `Err`, never panics, and every range it accepts lies in the file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64 + 1024;
    if let Ok(entries) =
        sd3_wgpu::weights::parse_header(std::path::Path::new("fuzz.safetensors"), data, len, 0)
    {
        for (_, e) in entries {
            assert!(e.range.0 <= e.range.1 && e.range.1 <= len);
        }
    }
});
