//! Any bytes as a T5 tokenizer folder's tokenizer.json: loading and encoding
//! end in `Ok` or `Err` (panics inside the tokenizers crate are contained).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("sd3-fuzz-tok-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    if std::fs::write(dir.join("tokenizer.json"), data).is_err() {
        return;
    }
    if let Ok(t) = sd3_wgpu::tokenize::PromptTokenizer::t5(&dir, 16) {
        let _ = t.encode("a cat 一只猫 🐈");
    }
});
