//! Any string as PNG metadata: the image is always written and the value
//! reads back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|value: String| {
    let p = std::env::temp_dir().join(format!("sd3-fuzz-{}.png", std::process::id()));
    let warnings = sd3_wgpu::image_io::save_png(&p, &[0, 0, 0], 1, 1, &[("prompt", value.clone())])
        .expect("the image is written");
    assert!(warnings.is_empty());
    let text = sd3_wgpu::image_io::png_text(&p).expect("it reads back");
    assert_eq!(text, vec![("prompt".to_string(), value)]);
});
