//! The `sd3` binary as a user runs it.

use std::process::Command;

fn sd3(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sd3"))
        .args(args)
        .output()
        .expect("run sd3");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn devices_lists_adapters_with_limits_and_features() {
    let (ok, out, err) = sd3(&["devices"]);
    assert!(ok, "{err}");
    assert!(out.contains("[0] "), "{out}");
    assert!(out.contains("max_storage_buffer_binding_size"), "{out}");
    assert!(out.contains("timestamp-query"), "{out}");
}

#[test]
fn bench_kernels_small_prints_throughput() {
    let (ok, out, err) = sd3(&["bench", "kernels", "--small", "--reps", "1"]);
    assert!(ok, "{err}");
    assert!(out.contains("GFLOP/s"), "{out}");
    assert!(out.contains("linear 333x192"), "{out}");
    assert!(out.contains("attention 1x3x333x64"), "{out}");
}

#[test]
fn bad_backend_and_adapter_are_clear_errors() {
    let (ok, _, err) = sd3(&["--backend", "glide", "devices"]);
    assert!(!ok);
    assert!(err.contains("unknown backend 'glide'"), "{err}");
    let (ok, _, err) = sd3(&["--adapter", "no-such-gpu", "bench", "kernels", "--small"]);
    assert!(!ok);
    assert!(err.contains("no GPU adapter matches"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn inspect_prints_the_detected_variant() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let (ok, out, err) = sd3(&["inspect", &format!("{dir}/tests/fixtures/mmdit/sd35l.safetensors")]);
    assert!(ok, "{err}");
    assert!(out.contains("variant: custom MMDiT (depth 2, hidden 64, heads 1"), "{out}");
    assert!(out.contains("qk RMSNorm"), "{out}");
    let (ok, _, err) = sd3(&["inspect", &format!("{dir}/README.md")]);
    assert!(!ok);
    assert!(err.contains("README.md: not a readable safetensors file"), "{err}");
}
