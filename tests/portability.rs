//! Portability without the hardware: every shader specialisation the engine
//! can request is parsed and validated by naga and translated to SPIR-V
//! (Vulkan), MSL (Metal) and HLSL (DX12). Also checks each kernel's Rust-side
//! binding list and params size against naga's reading of the WGSL.

use naga::back::{hlsl, msl, spv, PipelineConstants};
use naga::valid::{Capabilities, ValidationFlags, Validator};
use naga::{AddressSpace, ShaderStage, StorageAccess};
use sd3_wgpu::gpu::{shader, Access, Kernel};
use sd3_wgpu::ops::all_kernels;

/// Every subset of the kernel's flags.
fn flag_sets(k: &Kernel) -> Vec<Vec<&'static str>> {
    (0..1u32 << k.flags.len())
        .map(|mask| {
            k.flags
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, f)| *f)
                .collect()
        })
        .collect()
}

/// Every combination of the kernel's override constant values.
fn constant_sets(k: &Kernel) -> Vec<Vec<(&'static str, f64)>> {
    let mut sets = vec![Vec::new()];
    for (name, values) in k.constants {
        sets = sets
            .into_iter()
            .flat_map(|s| {
                values.iter().map(move |&v| {
                    let mut s = s.clone();
                    s.push((*name, v));
                    s
                })
            })
            .collect();
    }
    sets
}

fn parse(k: &Kernel, flags: &[&str]) -> (naga::Module, naga::valid::ModuleInfo) {
    let what = format!("{} ({}) with flags {flags:?}", k.file, k.entry);
    let src = shader::preprocess(k.file, flags).unwrap_or_else(|e| panic!("{what}: {e}"));
    let module = naga::front::wgsl::parse_str(&src)
        .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&src)));
    // unpack2x16float needs SHADER_FLOAT16_IN_FLOAT32, which wgpu grants on
    // Vulkan, Metal and DX12 (downlevel flag SHADER_F16_IN_F32).
    let info = Validator::new(
        ValidationFlags::all(),
        Capabilities::default() | Capabilities::SHADER_FLOAT16_IN_FLOAT32,
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&src)));
    (module, info)
}

#[test]
fn every_specialisation_translates_to_spirv_msl_and_hlsl() {
    let mut count = 0;
    for k in all_kernels() {
        for flags in flag_sets(k) {
            let (module, info) = parse(k, &flags);
            for consts in constant_sets(k) {
                let what = format!(
                    "{} ({}) flags {flags:?} constants {consts:?}",
                    k.file, k.entry
                );
                let mut pc = PipelineConstants::default();
                for (n, v) in &consts {
                    pc.insert(n.to_string(), *v);
                }
                let (m, i) = naga::back::pipeline_constants::process_overrides(
                    &module,
                    &info,
                    Some((ShaderStage::Compute, k.entry)),
                    &pc,
                )
                .unwrap_or_else(|e| panic!("{what}: overrides: {e}"));
                let spv_opts = spv::PipelineOptions {
                    shader_stage: ShaderStage::Compute,
                    entry_point: k.entry.to_string(),
                };
                spv::write_vec(&m, &i, &spv::Options::default(), Some(&spv_opts))
                    .unwrap_or_else(|e| panic!("{what}: SPIR-V: {e}"));
                let msl_opts = msl::PipelineOptions {
                    entry_point: Some((ShaderStage::Compute, k.entry.to_string())),
                    ..Default::default()
                };
                let msl_lang = msl::Options {
                    lang_version: (2, 0),
                    ..Default::default()
                };
                msl::write_string(&m, &i, &msl_lang, &msl_opts)
                    .unwrap_or_else(|e| panic!("{what}: MSL: {e}"));
                let hlsl_opts = hlsl::Options::default();
                let hlsl_pipe = hlsl::PipelineOptions {
                    entry_point: Some((ShaderStage::Compute, k.entry.to_string())),
                };
                let mut out = String::new();
                hlsl::Writer::new(&mut out, &hlsl_opts, &hlsl_pipe)
                    .write(&m, &i, None)
                    .unwrap_or_else(|e| panic!("{what}: HLSL: {e}"));
                count += 1;
            }
        }
    }
    // 7 families; a drop here means kernels silently left the list.
    eprintln!("{count} specialisations translated");
    assert!(count >= 25, "only {count} specialisations checked");
}

#[test]
fn binding_lists_and_params_match_the_wgsl() {
    for k in all_kernels() {
        for flags in flag_sets(k) {
            let (module, _) = parse(k, &flags);
            let what = format!("{} ({}) flags {flags:?}", k.file, k.entry);
            let mut layouter = naga::proc::Layouter::default();
            layouter.update(module.to_ctx()).expect("layout");
            let global = |binding: u32| {
                module
                    .global_variables
                    .iter()
                    .map(|(_, g)| g)
                    .find(|g| {
                        g.binding
                            .as_ref()
                            .is_some_and(|b| b.group == 0 && b.binding == binding)
                    })
                    .unwrap_or_else(|| panic!("{what}: no global at binding {binding}"))
            };
            let params = global(0);
            assert_eq!(
                params.space,
                AddressSpace::Uniform,
                "{what}: binding 0 must be the params uniform"
            );
            assert_eq!(
                layouter[params.ty].size as usize, k.params_size,
                "{what}: WGSL Params is {} bytes, the Rust params struct {}",
                layouter[params.ty].size, k.params_size
            );
            for (i, b) in k.bindings.iter().enumerate() {
                let g = global(i as u32 + 1);
                assert_eq!(g.name.as_deref(), Some(b.name), "{what}: binding {}", i + 1);
                let AddressSpace::Storage { access } = g.space else {
                    panic!(
                        "{what}: binding {} ('{}') is not a storage buffer",
                        i + 1,
                        b.name
                    );
                };
                let writes = access.contains(StorageAccess::STORE);
                assert_eq!(
                    writes,
                    b.access == Access::ReadWrite,
                    "{what}: access of '{}'",
                    b.name
                );
            }
            let extra = module
                .global_variables
                .iter()
                .filter(|(_, g)| {
                    g.binding
                        .as_ref()
                        .is_some_and(|b| b.binding as usize > k.bindings.len())
                })
                .count();
            assert_eq!(
                extra, 0,
                "{what}: the WGSL declares bindings the Rust list lacks"
            );
        }
    }
}

#[test]
fn preprocessor_rejects_unknown_directives() {
    assert!(shader::preprocess("no-such-file.wgsl", &[]).is_err());
    let all = shader::SOURCES.iter().map(|(n, _)| *n);
    for name in all {
        shader::preprocess(name, &["W_F16", "VEC4"]).expect("every shader preprocesses");
    }
}
