//! The WGSL sources in `shaders/` and the tiny preprocessor that specialises them.
//!
//! Numbers (workgroup sizes, tile sizes, op selectors) are WGSL `override`
//! constants set at pipeline creation. Types (f16 weight storage, vector width)
//! cannot be overridden in WGSL, so a file may use exactly these directives,
//! each on a line of its own:
//!
//! - `#include "file.wgsl"`: paste another file from `shaders/` (once per file).
//! - `#if FLAG` / `#if !FLAG`, `#else`, `#endif`: keep lines when FLAG is (not) set.
//!
//! Storage types: `W_F16` reads weights as f16 packed two to a u32 (no
//! feature needed); `<BINDING>_F16` (e.g. `X_F16`, `Y_F16`) makes that
//! activation binding a native `array<f16>`. Any of the latter also sets
//! `F16`, under which a file opens with `enable f16;` (SHADER_F16).
//!
//! Nothing else: WGSL is never assembled from Rust strings.

use super::GpuError;

/// Every shader file, embedded at build time.
pub const SOURCES: &[(&str, &str)] = &[
    ("common.wgsl", include_str!("../../shaders/common.wgsl")),
    ("weights.wgsl", include_str!("../../shaders/weights.wgsl")),
    ("reduce.wgsl", include_str!("../../shaders/reduce.wgsl")),
    ("linear.wgsl", include_str!("../../shaders/linear.wgsl")),
    (
        "coop_gemm.wgsl",
        include_str!("../../shaders/coop_gemm.wgsl"),
    ),
    (
        "linear_coop.wgsl",
        include_str!("../../shaders/linear_coop.wgsl"),
    ),
    ("norm.wgsl", include_str!("../../shaders/norm.wgsl")),
    ("softmax.wgsl", include_str!("../../shaders/softmax.wgsl")),
    (
        "elementwise.wgsl",
        include_str!("../../shaders/elementwise.wgsl"),
    ),
    (
        "attention_io.wgsl",
        include_str!("../../shaders/attention_io.wgsl"),
    ),
    (
        "coop_frag.wgsl",
        include_str!("../../shaders/coop_frag.wgsl"),
    ),
    (
        "attention.wgsl",
        include_str!("../../shaders/attention.wgsl"),
    ),
    (
        "attention_coop.wgsl",
        include_str!("../../shaders/attention_coop.wgsl"),
    ),
    ("conv.wgsl", include_str!("../../shaders/conv.wgsl")),
    (
        "conv_coop.wgsl",
        include_str!("../../shaders/conv_coop.wgsl"),
    ),
    ("layout.wgsl", include_str!("../../shaders/layout.wgsl")),
    ("random.wgsl", include_str!("../../shaders/random.wgsl")),
    (
        "residual_norm.wgsl",
        include_str!("../../shaders/residual_norm.wgsl"),
    ),
    ("sampler.wgsl", include_str!("../../shaders/sampler.wgsl")),
    ("lora.wgsl", include_str!("../../shaders/lora.wgsl")),
];

/// The raw text of a shader file.
pub fn source(file: &str) -> Result<&'static str, GpuError> {
    SOURCES
        .iter()
        .find(|(name, _)| *name == file)
        .map(|(_, src)| *src)
        .ok_or_else(|| GpuError::Shader(format!("no shader file '{file}' in shaders/")))
}

/// Expands `#include` and `#if` directives of `file` with the given flags set.
/// A flag that no `#if` of the file (or of what it includes) tests is an
/// error: a misspelt flag must not silently select the default branch.
pub fn preprocess(file: &str, flags: &[&str]) -> Result<String, GpuError> {
    let known = known_flags(file)?;
    if let Some(f) = flags.iter().find(|f| !known.iter().any(|k| k == *f)) {
        return Err(GpuError::Shader(format!(
            "{file}: unknown flag '{f}' (its #if directives test {known:?})"
        )));
    }
    let mut flags = flags.to_vec();
    if flags.iter().any(|f| is_activation_f16(f)) {
        flags.push("F16");
    }
    let flags = &flags[..];
    let mut out = String::new();
    let mut included = Vec::new();
    expand(file, flags, &mut out, &mut included)?;
    Ok(out)
}

/// Whether `flag` makes an activation binding f16 (`X_F16`, not `W_F16`),
/// which needs `enable f16;`.
pub fn is_activation_f16(flag: &str) -> bool {
    flag.ends_with("_F16") && flag != "W_F16"
}

/// Every flag an `#if` of `file` or of its includes tests (`F16` aside: it
/// follows from the activation flags).
pub fn known_flags(file: &str) -> Result<Vec<String>, GpuError> {
    fn walk(file: &str, seen: &mut Vec<String>, flags: &mut Vec<String>) -> Result<(), GpuError> {
        if seen.iter().any(|f| f == file) {
            return Ok(());
        }
        seen.push(file.to_string());
        for line in source(file)?.lines() {
            let t = line.trim();
            if let Some(rest) = t.strip_prefix("#if ") {
                let flag = rest.trim().trim_start_matches('!').trim().to_string();
                if !flags.contains(&flag) {
                    flags.push(flag);
                }
            } else if let Some(rest) = t.strip_prefix("#include ") {
                walk(rest.trim().trim_matches('"'), seen, flags)?;
            }
        }
        Ok(())
    }
    let mut flags = Vec::new();
    walk(file, &mut Vec::new(), &mut flags)?;
    flags.retain(|f| f != "F16");
    Ok(flags)
}

fn expand(
    file: &str,
    flags: &[&str],
    out: &mut String,
    included: &mut Vec<String>,
) -> Result<(), GpuError> {
    if included.iter().any(|f| f == file) {
        return Ok(());
    }
    included.push(file.to_string());
    let src = source(file)?;
    // Each entry: (this branch is kept, an enclosing branch is kept).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let active = |stack: &[(bool, bool)]| stack.iter().all(|&(this, _)| this);
    for (n, line) in src.lines().enumerate() {
        let t = line.trim();
        let err = |m: &str| GpuError::Shader(format!("{file}:{}: {m}", n + 1));
        if let Some(rest) = t.strip_prefix("#if ") {
            let rest = rest.trim();
            let (neg, flag) = match rest.strip_prefix('!') {
                Some(f) => (true, f.trim()),
                None => (false, rest),
            };
            let on = flags.contains(&flag) != neg;
            let outer = active(&stack);
            stack.push((on, outer));
        } else if t == "#else" {
            let top = stack.last_mut().ok_or_else(|| err("#else without #if"))?;
            top.0 = !top.0;
        } else if t == "#endif" {
            stack.pop().ok_or_else(|| err("#endif without #if"))?;
        } else if let Some(rest) = t.strip_prefix("#include ") {
            if active(&stack) {
                let name = rest.trim().trim_matches('"');
                expand(name, flags, out, included)?;
            }
        } else if t.starts_with('#') {
            return Err(err(&format!("unknown directive '{t}'")));
        } else if active(&stack) {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !stack.is_empty() {
        return Err(GpuError::Shader(format!("{file}: #if without #endif")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_select_branches_and_includes_expand_once() {
        let f16 = preprocess("linear.wgsl", &["W_F16"]).expect("preprocess");
        assert!(f16.contains("alias WElem = u32;"));
        assert!(!f16.contains("alias WElem = f32;"));
        assert!(!f16.contains("#if"));
        let f32 = preprocess("linear.wgsl", &[]).expect("preprocess");
        assert!(f32.contains("alias WElem = f32;"));
        let vec4 = preprocess("linear.wgsl", &["VEC4", "W_F16"]).expect("preprocess");
        assert!(vec4.contains("alias WElem = vec2<u32>;"));
        let conv = preprocess("conv.wgsl", &["W_F16"]).expect("preprocess");
        assert_eq!(
            conv.matches("fn flat_index").count(),
            1,
            "common.wgsl pasted once"
        );
    }
}
